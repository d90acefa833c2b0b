package tokenwire_test

import (
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

// step is one thing the fake server does: wait, then send a message (if any).
type step struct {
	pause   time.Duration
	message *pb.StreamRespondResponse
}

// fakeServer is a RespondService that plays a script, so a test can make the
// server break the contract (a gap, a repeat...) or go silent, as no real
// tokenwire would.
type fakeServer struct {
	pb.UnimplementedRespondServiceServer
	script []step
}

func (f *fakeServer) StreamRespond(_ *pb.StreamRespondRequest, stream grpc.ServerStreamingServer[pb.StreamRespondResponse]) error {
	for _, s := range f.script {
		select {
		case <-time.After(s.pause):
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
		if s.message != nil {
			if err := stream.Send(s.message); err != nil {
				return err
			}
		}
	}
	return nil
}

// startFake serves the script on a loopback port until the test ends.
func startFake(t *testing.T, script ...step) string {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	pb.RegisterRespondServiceServer(server, &fakeServer{script: script})
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return listener.Addr().String()
}

func send(message *pb.StreamRespondResponse) step { return step{message: message} }

// connected makes the client's connection before a test times a silence (on
// a busy machine the first dial alone can outlast a short stall timeout):
// the fake answers Respond with UNIMPLEMENTED once the connection is up.
func connected(t *testing.T, client *tokenwire.Client) {
	t.Helper()
	if _, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "x"}); !errors.Is(err, tokenwire.ErrUnimplemented) {
		t.Fatalf("warm-up call: %v", err)
	}
}

// hook records the observations a client reports.
type hook struct {
	mu   sync.Mutex
	seen []tokenwire.Observation
}

func (h *hook) observe(o tokenwire.Observation) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seen = append(h.seen, o)
}

func (h *hook) observations() []tokenwire.Observation {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]tokenwire.Observation(nil), h.seen...)
}

func TestOrderingViolationsAreCountedPerClient(t *testing.T) {
	cases := []struct {
		name   string
		script []step
		kind   tokenwire.ObservationKind
		want   tokenwire.Observed
	}{
		{"gap", []step{send(chunk(1, "ab", 0)), send(chunk(3, "cd", 2))},
			tokenwire.SequenceGap, tokenwire.Observed{SequenceGaps: 1}},
		{"completed names chunks never received", []step{send(chunk(1, "ab", 0)), send(completed("abcd", "", 2, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0))},
			tokenwire.SequenceGap, tokenwire.Observed{SequenceGaps: 1}},
		{"repeat", []step{send(chunk(1, "ab", 0)), send(chunk(1, "ab", 0))},
			tokenwire.SequenceRepeat, tokenwire.Observed{SequenceRepeats: 1}},
		{"offset", []step{send(chunk(1, "é", 0)), send(chunk(2, "x", 1))}, // "é" is two bytes
			tokenwire.OffsetMismatch, tokenwire.Observed{OffsetMismatches: 1}},
		{"event after Completed", []step{send(chunk(1, "ab", 0)), send(completed("ab", "", 1, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0)), send(chunk(2, "cd", 2))},
			tokenwire.EventAfterCompleted, tokenwire.Observed{EventsAfterCompleted: 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			address := startFake(t, c.script...)
			var heard hook
			client := dial(t, address, tokenwire.WithObservationHook(heard.observe))
			for attempt := 1; attempt <= 2; attempt++ { // counts add up over the client's streams
				_, err := client.Stream(testContext(t), tokenwire.Request{Prompt: "x"}).Collect()
				var protocol *tokenwire.ProtocolError
				if !errors.As(err, &protocol) {
					t.Fatalf("err %v (%T), want *ProtocolError", err, err)
				}
			}
			want := c.want
			want.SequenceGaps *= 2
			want.SequenceRepeats *= 2
			want.OffsetMismatches *= 2
			want.EventsAfterCompleted *= 2
			if got := client.Observed(); got != want || got.OrderingViolations() != 2 || got.Stalls != 0 {
				t.Fatalf("observed %+v (%d violations), want %+v", got, got.OrderingViolations(), want)
			}
			seen := heard.observations()
			if len(seen) != 2 || seen[0].Kind != c.kind || seen[0].ResponseID != "r" || seen[0].Detail == "" {
				t.Fatalf("hook heard %+v, want two %s", seen, c.kind)
			}
			if other := dial(t, address); other.Observed() != (tokenwire.Observed{}) {
				t.Fatal("another client shares the counts")
			}
		})
	}
}

func TestAStallIsCountedOnceAndTheStreamGoesOn(t *testing.T) {
	address := startFake(t,
		send(chunk(1, "ab", 0)),
		step{pause: time.Second, message: chunk(2, "cd", 2)}, // one long silence
		step{pause: 50 * time.Millisecond, message: completed("abcd", "", 2, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0)},
	)
	var heard hook
	client := dial(t, address,
		tokenwire.WithStallTimeout(200*time.Millisecond), tokenwire.WithObservationHook(heard.observe))
	connected(t, client)
	result, err := client.Stream(testContext(t), tokenwire.Request{Prompt: "x"}).Collect()
	if err != nil || result.Text != "abcd" || !result.Verified() {
		t.Fatalf("result %+v, err %v: a stall must not end the stream", result, err)
	}
	got := client.Observed()
	if got.Stalls != 1 || got.OrderingViolations() != 0 {
		t.Fatalf("observed %+v, want one stall for one silence of 5 timeouts", got)
	}
	seen := heard.observations()
	if len(seen) != 1 || seen[0].Kind != tokenwire.Stall || seen[0].LastSequence != 1 || seen[0].ResponseID != "r" {
		t.Fatalf("hook heard %+v", seen)
	}
}

func TestAStallCanBeTurnedOff(t *testing.T) {
	address := startFake(t,
		step{pause: 300 * time.Millisecond, message: chunk(1, "ab", 0)},
		send(completed("ab", "", 1, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0)),
	)
	client := dial(t, address, tokenwire.WithStallTimeout(0))
	if _, err := client.Stream(testContext(t), tokenwire.Request{Prompt: "x"}).Collect(); err != nil {
		t.Fatal(err)
	}
	if got := client.Observed(); got != (tokenwire.Observed{}) {
		t.Fatalf("observed %+v with stall counting off", got)
	}
}

func TestAReaderThatPausesIsNotAStall(t *testing.T) {
	address := startFake(t,
		send(chunk(1, "ab", 0)), send(chunk(2, "cd", 2)),
		send(completed("abcd", "", 2, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0)),
	)
	client := dial(t, address, tokenwire.WithStallTimeout(200*time.Millisecond))
	connected(t, client)
	stream := client.Stream(testContext(t), tokenwire.Request{Prompt: "x"})
	defer stream.Close()
	for {
		event, err := stream.Recv()
		if err != nil {
			break
		}
		if _, ok := event.(*tokenwire.Chunk); ok {
			time.Sleep(500 * time.Millisecond) // the caller is busy, the server is not silent
		}
	}
	if got := client.Observed(); got.Stalls != 0 {
		t.Fatalf("observed %+v: time between reads is not the server's silence", got)
	}
}

func TestARealServerCountsNothingAndHeartbeatsAreNotStalls(t *testing.T) {
	// The shared server sends a heartbeat every 0.1 s of silence.
	client := dial(t, server.address, tokenwire.WithStallTimeout(time.Second))
	if _, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "x", MaxTokens: 4}); err != nil {
		t.Fatal(err) // connected before the silences are timed
	}
	read(t, client.Stream(testContext(t), tokenwire.Request{Prompt: "x", Mode: tokenwire.ModeStream, Labels: slow}))
	read(t, client.Stream(testContext(t), tokenwire.Request{ // silent 2.5 timeouts, heartbeats every 0.1 s
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokens: 8,
		Labels: map[string]string{"tokenwire.sim/ttft-ms": "2500"},
	}))
	if got := client.Observed(); got != (tokenwire.Observed{}) {
		t.Fatalf("observed %+v on healthy streams", got)
	}
}

func TestARealServerSilentPastTheStallTimeout(t *testing.T) {
	silent := startServeT(t, append(fastSimulator, "--heartbeat-interval", "5")...)
	client := dial(t, silent.address, tokenwire.WithStallTimeout(500*time.Millisecond))
	result, err := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokens: 8,
		Labels: map[string]string{"tokenwire.sim/ttft-ms": "2000"},
	}).Collect()
	if err != nil || !result.Verified() {
		t.Fatalf("result %+v, err %v", result, err)
	}
	if got := client.Observed(); got.Stalls != 1 || got.OrderingViolations() != 0 {
		t.Fatalf("observed %+v, want one stall", got)
	}
}
