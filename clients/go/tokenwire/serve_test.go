package tokenwire_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// A real `tokenwire serve` process: the command in TOKENWIRE_SERVE_CMD
// (space-separated, e.g. "/usr/bin/python3 -m tokenwire.cli serve"), else
// `tokenwire serve` from PATH.
type serveProcess struct {
	cmd     *exec.Cmd
	address string
	stderr  *os.File
}

var servingOn = regexp.MustCompile(`serving on \S+:(\d+)`)

// fastSimulator: fast but not instant generation, so streams really interleave.
var fastSimulator = []string{"--sim-time-to-first-token", "0", "--sim-inter-token-delay", "0.0005"}

func startServe(flags ...string) (*serveProcess, error) {
	argv := []string{"tokenwire", "serve"}
	if custom := strings.Fields(os.Getenv("TOKENWIRE_SERVE_CMD")); len(custom) > 0 {
		argv = custom
	}
	argv = append(argv, "--port", "0", "--audit-path", ":memory:", "--log-level", "WARNING")
	argv = append(argv, flags...)
	cmd := exec.Command(argv[0], argv[1:]...)
	// No TOKENWIRE_* settings from the environment leak into the server.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TOKENWIRE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	setParentDeathSignal(cmd)
	stderr, err := os.CreateTemp("", "tokenwire-serve-*.log")
	if err != nil {
		return nil, err
	}
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %q: %w", argv, err)
	}
	p := &serveProcess{cmd: cmd, stderr: stderr}
	lines := make(chan string, 1)
	go func() {
		reader := bufio.NewReader(stdout)
		line, _ := reader.ReadString('\n')
		lines <- line
		_, _ = io.Copy(io.Discard, reader)
	}()
	select {
	case line := <-lines:
		match := servingOn.FindStringSubmatch(line)
		if match == nil {
			p.stop()
			return nil, fmt.Errorf("%q printed %q, not `serving on HOST:PORT`; stderr: %s", argv, line, p.logs())
		}
		p.address = "127.0.0.1:" + match[1]
		return p, nil
	case <-time.After(30 * time.Second):
		p.stop()
		return nil, fmt.Errorf("%q did not start within 30 s; stderr: %s", argv, p.logs())
	}
}

func (p *serveProcess) logs() string {
	data, _ := os.ReadFile(p.stderr.Name())
	return string(data)
}

func (p *serveProcess) stop() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
	_ = p.stderr.Close()
	_ = os.Remove(p.stderr.Name())
}

// startServeT starts a server for one test and stops it when the test ends.
func startServeT(t *testing.T, flags ...string) *serveProcess {
	t.Helper()
	p, err := startServe(flags...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	return p
}

// cuttableProxy is a loopback TCP proxy whose connections a test can cut:
// a dropped network, for real.
type cuttableProxy struct {
	listener    net.Listener
	target      string
	mu          sync.Mutex
	conns       map[net.Conn]struct{}
	connections int
}

func newCuttableProxy(t *testing.T, target string) *cuttableProxy {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cuttableProxy{listener: listener, target: target, conns: map[net.Conn]struct{}{}}
	go p.accept()
	t.Cleanup(func() {
		_ = listener.Close()
		p.Cut()
	})
	return p
}

func (p *cuttableProxy) Address() string { return p.listener.Addr().String() }

func (p *cuttableProxy) Connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.connections
}

func (p *cuttableProxy) accept() {
	for {
		client, err := p.listener.Accept()
		if err != nil {
			return
		}
		upstream, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = client.Close()
			continue
		}
		p.mu.Lock()
		p.connections++
		p.conns[client], p.conns[upstream] = struct{}{}, struct{}{}
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			_, _ = io.Copy(dst, src)
			_ = dst.Close()
			_ = src.Close()
		}
		go pipe(upstream, client)
		go pipe(client, upstream)
	}
}

// Cut drops every open connection at once, both ways (RST); new ones are
// still accepted.
func (p *cuttableProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for conn := range p.conns {
		if tcp, ok := conn.(*net.TCPConn); ok {
			_ = tcp.SetLinger(0)
		}
		if err := conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			continue
		}
	}
	clear(p.conns)
}
