// Command example streams one tokenwire response: the text to stdout as it
// arrives, then a summary line (mode, chunks, verified SHA-256, timings,
// finish reason, verdict, tokens, retraction if any) to stderr.
//
//	go run ./cmd/example "Why stream tokens?"
//	go run ./cmd/example -addr localhost:50051 -model echo -mode buffered "exact text"
//	go run ./cmd/example -tls-ca ca.pem -tls-cert client.pem -tls-key client.key "hi"
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"time"

	"google.golang.org/grpc/credentials"

	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

type labels map[string]string

func (l labels) String() string { return fmt.Sprint(map[string]string(l)) }

func (l labels) Set(value string) error {
	key, val, ok := strings.Cut(value, "=")
	if !ok {
		return errors.New("want KEY=VALUE")
	}
	l[key] = val
	return nil
}

func main() {
	os.Exit(run())
}

func run() int {
	addr := flag.String("addr", tokenwire.DefaultTarget, "server address host:port")
	model := flag.String("model", "", "model (empty: the server's default)")
	mode := flag.String("mode", "auto", "delivery mode: auto, stream or buffered")
	unary := flag.Bool("unary", false, "call unary Respond instead of StreamRespond")
	maxTokens := flag.Int("max-tokens", 0, "upper bound on generated tokens (0: server default)")
	resumable := flag.Bool("resumable", true, "resume by sequence if the connection drops")
	timeout := flag.Duration("timeout", tokenwire.DefaultTimeout, "deadline of the call")
	useTLS := flag.Bool("tls", false, "TLS with the system's roots")
	tlsCA := flag.String("tls-ca", "", "PEM file of the CA that signed the server's certificate (implies TLS)")
	tlsCert := flag.String("tls-cert", "", "client certificate PEM for mTLS (with -tls-key)")
	tlsKey := flag.String("tls-key", "", "client key PEM for mTLS (with -tls-cert)")
	apiKey := flag.String("api-key", os.Getenv("TOKENWIRE_API_KEY"), "API key (sent as authorization: Bearer KEY)")
	extra := labels{}
	flag.Var(extra, "label", "request label KEY=VALUE (repeatable), e.g. tokenwire.sim/inter-token-ms=20")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: example [flags] PROMPT\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		return 2
	}

	opts := []tokenwire.Option{tokenwire.WithTimeout(*timeout)}
	if *useTLS || *tlsCA != "" || *tlsCert != "" {
		var creds credentials.TransportCredentials
		creds, err := tokenwire.TLSCredentials(*tlsCA, *tlsCert, *tlsKey)
		if err != nil {
			fmt.Fprintln(os.Stderr, "example:", err)
			return 2
		}
		opts = append(opts, tokenwire.WithTransportCredentials(creds))
	}
	if *apiKey != "" {
		opts = append(opts, tokenwire.WithAPIKey(*apiKey))
	}
	client, err := tokenwire.Dial(*addr, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "example:", err)
		return 2
	}
	defer client.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	request := tokenwire.Request{
		Prompt: flag.Arg(0), Model: *model, MaxTokens: int32(*maxTokens), Labels: extra,
		Mode: tokenwire.Mode(*mode), Resumable: *resumable,
	}

	var result *tokenwire.Result
	if *unary {
		result, err = client.Respond(ctx, request)
		if err == nil {
			fmt.Print(result.Text)
		}
	} else {
		result, err = stream(ctx, client, request)
	}
	fmt.Println()
	if err != nil {
		report(err)
		return 1
	}
	fmt.Fprintln(os.Stderr, summary(result, *unary))
	return 0
}

func stream(ctx context.Context, client *tokenwire.Client, request tokenwire.Request) (*tokenwire.Result, error) {
	s := client.Stream(ctx, request)
	defer s.Close()
	for {
		event, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return s.Result(), nil
		}
		if err != nil {
			if ctx.Err() != nil && s.ResponseID() != "" && request.Resumable {
				// Ctrl-C: stop generation on the server too, not only delivery.
				cancelCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_, _ = client.CancelResponse(cancelCtx, s.ResponseID())
			}
			return nil, err
		}
		switch event := event.(type) {
		case *tokenwire.Chunk:
			fmt.Print(event.Text)
		case *tokenwire.Retraction:
			fmt.Printf("\n[retracted from chunk %d; final text follows]\n%s", event.FromSequence, event.FinalText)
		}
	}
}

func report(err error) {
	var twErr *tokenwire.Error
	if errors.As(err, &twErr) {
		fmt.Fprintln(os.Stderr, "error:", twErr)
		for _, v := range twErr.FieldViolations {
			fmt.Fprintf(os.Stderr, "  %s: %s\n", v.Field, v.Description)
		}
		if twErr.HasRetryDelay {
			fmt.Fprintf(os.Stderr, "  retry after %v\n", twErr.RetryDelay)
		}
		if twErr.HasLastSequence {
			fmt.Fprintf(os.Stderr, "  last sequence received: %d\n", twErr.LastSequence)
		}
		return
	}
	fmt.Fprintln(os.Stderr, "error:", err)
}

// summary renders the line `tokenwire ask` prints:
// [stream · 64 chunks · sha256 7d97aa131cd4… verified · ttft 20.4 ms · total 355.6 ms · stop · allowed · 64 tokens]
func summary(result *tokenwire.Result, unary bool) string {
	completed := result.Completed
	mode := strings.ToLower(strings.TrimPrefix(completed.GetDeliveryMode().String(), "DELIVERY_MODE_"))
	if unary {
		mode = "unary"
	}
	verified := "verified"
	if !result.Verified() {
		verified = "NOT VERIFIED"
	}
	parts := []string{
		mode,
		fmt.Sprintf("%d chunks", result.ChunkCount),
		fmt.Sprintf("sha256 %.12s… %s", result.SHA256, verified),
		fmt.Sprintf("ttft %.1f ms", float64(result.TimeToFirstToken().Microseconds())/1000),
		fmt.Sprintf("total %.1f ms", float64(result.TotalTime().Microseconds())/1000),
		strings.ToLower(strings.TrimPrefix(completed.GetFinishReason().String(), "FINISH_REASON_")),
		strings.ToLower(strings.TrimPrefix(completed.GetVerdict().String(), "VERDICT_")),
		fmt.Sprintf("%d tokens", completed.GetUsage().GetCompletionTokens()),
	}
	if r := result.Retraction; r != nil {
		parts = append(parts, fmt.Sprintf("retracted from chunk %d (kept %d bytes)", r.FromSequence, r.FromOffset))
	}
	return "[" + strings.Join(parts, " · ") + "]"
}
