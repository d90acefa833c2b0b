package tokenwire_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

// server is the `tokenwire serve` process most tests share (TestMain).
var server *serveProcess

func TestMain(m *testing.M) {
	var err error
	server, err = startServe(append(fastSimulator, "--heartbeat-interval", "0.1")...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tokenwire serve:", err)
		os.Exit(1)
	}
	code := m.Run()
	server.stop()
	os.Exit(code)
}

func dial(t *testing.T, address string, opts ...tokenwire.Option) *tokenwire.Client {
	t.Helper()
	client, err := tokenwire.Dial(address, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// slow generation: 60 tokens, 10 ms apart.
var slow = map[string]string{"tokenwire.sim/inter-token-ms": "10", "tokenwire.sim/answer-tokens": "60"}

// read collects every event of a stream, failing the test on an error.
func read(t *testing.T, stream *tokenwire.Stream) []tokenwire.Event {
	t.Helper()
	var events []tokenwire.Event
	for event, err := range stream.Events() {
		if err != nil {
			t.Fatalf("stream failed after %d events: %v", len(events), err)
		}
		events = append(events, event)
	}
	return events
}

func chunksOf(events []tokenwire.Event) []*tokenwire.Chunk {
	var chunks []*tokenwire.Chunk
	for _, event := range events {
		if chunk, ok := event.(*tokenwire.Chunk); ok {
			chunks = append(chunks, chunk)
		}
	}
	return chunks
}

func TestStreamIsReassembledAndVerified(t *testing.T) {
	client := dial(t, server.address)
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "Tell me about streams", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1, RequestID: "go-stream-1",
	})
	events := read(t, stream)
	chunks := chunksOf(events)
	if len(chunks) < 2 {
		t.Fatalf("want a real stream, got %d chunks", len(chunks))
	}
	var text strings.Builder
	for i, chunk := range chunks {
		if chunk.Sequence != uint32(i+1) || chunk.TextOffset != uint32(text.Len()) {
			t.Fatalf("chunk %d: sequence %d offset %d", i, chunk.Sequence, chunk.TextOffset)
		}
		if chunk.Message.GetGovernance().GetPolicyId() == "" {
			t.Fatalf("chunk %d carries no governance", chunk.Sequence)
		}
		text.WriteString(chunk.Text)
	}
	completion, ok := events[len(events)-1].(*tokenwire.Completion)
	if !ok {
		t.Fatalf("last event is %T, want *Completion", events[len(events)-1])
	}
	result := stream.Result()
	if completion.Result != result || result.Text != text.String() || !result.Verified() || result.Retraction != nil {
		t.Fatalf("result %+v does not match the %d chunks", result, len(chunks))
	}
	if result.ChunkCount != uint32(len(chunks)) || result.Completed.GetChunkCount() != uint32(len(chunks)) {
		t.Fatalf("chunk count %d / %d, received %d", result.ChunkCount, result.Completed.GetChunkCount(), len(chunks))
	}
	if result.Completed.GetDeliveryMode() != pb.DeliveryMode_DELIVERY_MODE_STREAM {
		t.Fatalf("delivery mode %v", result.Completed.GetDeliveryMode())
	}
	if result.RequestID != "go-stream-1" || stream.RequestID() != "go-stream-1" {
		t.Fatalf("request id %q / %q", result.RequestID, stream.RequestID())
	}
	if result.TotalTime() <= 0 || result.TimeToFirstToken() <= 0 {
		t.Fatalf("timings %v %v", result.TimeToFirstToken(), result.TotalTime())
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after the end: %v, want io.EOF", err)
	}
}

func TestRecvEndsWithCompletionThenEOF(t *testing.T) {
	client := dial(t, server.address)
	stream := client.Stream(testContext(t), tokenwire.Request{Prompt: "recv loop", Model: "echo"})
	defer stream.Close()
	var last tokenwire.Event
	for {
		event, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		last = event
	}
	if _, ok := last.(*tokenwire.Completion); !ok || stream.Result().Text != "recv loop" {
		t.Fatalf("last event %T, result %+v", last, stream.Result())
	}
}

func TestBufferedModeIsOneVerifiedChunk(t *testing.T) {
	client := dial(t, server.address)
	stream := client.Stream(testContext(t), tokenwire.Request{Prompt: "Buffered please", Mode: tokenwire.ModeBuffered})
	chunks := chunksOf(read(t, stream))
	result := stream.Result()
	if len(chunks) != 1 || chunks[0].Text != result.Text || !result.Verified() {
		t.Fatalf("%d chunks, result %q verified=%v", len(chunks), result.Text, result.Verified())
	}
	if result.Completed.GetDeliveryMode() != pb.DeliveryMode_DELIVERY_MODE_BUFFERED {
		t.Fatalf("delivery mode %v", result.Completed.GetDeliveryMode())
	}
}

func TestCollectWithOmitFinalText(t *testing.T) {
	client := dial(t, server.address)
	result, err := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "exact text through the pipeline", Model: "echo", Mode: tokenwire.ModeStream, OmitFinalText: true,
	}).Collect()
	if err != nil {
		t.Fatal(err)
	}
	if result.Text != "exact text through the pipeline" || !result.Verified() || result.Completed.GetFinalText() != "" {
		t.Fatalf("result %q verified=%v final_text %q", result.Text, result.Verified(), result.Completed.GetFinalText())
	}
}

func TestUnaryRespond(t *testing.T) {
	client := dial(t, server.address)
	seed := int64(7)
	result, err := client.Respond(testContext(t), tokenwire.Request{
		Prompt: "Short answer please", MaxTokens: 16, Seed: &seed, RequestID: "go-unary-1",
	})
	if err != nil {
		t.Fatal(err)
	}
	if result.Text == "" || !result.Verified() || result.ChunkCount != 0 || result.Completed.GetChunkCount() != 0 {
		t.Fatalf("unary result %+v", result)
	}
	if result.RequestID != "go-unary-1" || result.Completed.GetUsage().GetCompletionTokens() == 0 {
		t.Fatalf("request id %q usage %v", result.RequestID, result.Completed.GetUsage())
	}
	again, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "Short answer please", MaxTokens: 16, Seed: &seed})
	if err != nil || again.SHA256 != result.SHA256 {
		t.Fatalf("same seed, different answer: %v %v", again, err)
	}
}

func TestInvalidArgumentCarriesFieldViolations(t *testing.T) {
	client := dial(t, server.address)
	_, err := client.Stream(testContext(t), tokenwire.Request{Prompt: "x", MaxTokens: 1_000_000}).Collect()
	var twErr *tokenwire.Error
	if !errors.As(err, &twErr) {
		t.Fatalf("err %v (%T), want *tokenwire.Error", err, err)
	}
	if twErr.Code != codes.InvalidArgument || twErr.Reason != "MAX_TOKENS_TOO_LARGE" || twErr.Domain != tokenwire.ErrorDomain {
		t.Fatalf("got %v reason %q domain %q", twErr.Code, twErr.Reason, twErr.Domain)
	}
	if len(twErr.FieldViolations) != 1 || twErr.FieldViolations[0].Field != "params.max_tokens" {
		t.Fatalf("field violations %+v", twErr.FieldViolations)
	}
	if !errors.Is(err, tokenwire.ErrInvalidArgument) || errors.Is(err, tokenwire.ErrNotFound) {
		t.Fatal("errors.Is does not match the code")
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("status.Code = %v", status.Code(err))
	}

	// Unary too, and every offending field at once.
	temperature := 5.0
	_, err = client.Respond(testContext(t), tokenwire.Request{
		Messages:    []*pb.ChatMessage{{Role: pb.Role_ROLE_USER, Content: ""}},
		Temperature: &temperature,
	})
	if !errors.As(err, &twErr) || twErr.Code != codes.InvalidArgument {
		t.Fatalf("unary: %v", err)
	}
	fields := map[string]bool{}
	for _, v := range twErr.FieldViolations {
		fields[v.Field] = v.Description != ""
	}
	if len(fields) < 2 || !fields["params.temperature"] {
		t.Fatalf("unary field violations %+v", twErr.FieldViolations)
	}
}

func TestUnknownModelIsTypedNotFound(t *testing.T) {
	client := dial(t, server.address)
	_, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "x", Model: "missing"})
	var twErr *tokenwire.Error
	if !errors.As(err, &twErr) || !errors.Is(err, tokenwire.ErrNotFound) || twErr.Reason != "MODEL_NOT_FOUND" {
		t.Fatalf("unary: %v", err)
	}
	if !strings.Contains(twErr.Metadata["knownModels"], "echo") {
		t.Fatalf("metadata %v", twErr.Metadata)
	}
	_, err = client.Stream(testContext(t), tokenwire.Request{Prompt: "x", Model: "missing"}).Collect()
	if !errors.As(err, &twErr) || twErr.Code != codes.NotFound || twErr.Reason != "MODEL_NOT_FOUND" {
		t.Fatalf("stream: %v", err)
	}
	if !strings.HasPrefix(err.Error(), "NOT_FOUND MODEL_NOT_FOUND: ") {
		t.Fatalf("message %q", err.Error())
	}
}

const policyYAML = `id: go-test
version: "3"
refusal_text: "Blocked by go-test policy."
block:
  - id: codename
    terms: ["project nightingale"]
  - id: final-check
    scope: final
    pattern: '(?i)launch codes'
`

func TestRetractionIsAnExplicitEvent(t *testing.T) {
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(policy, []byte(policyYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	governed := startServeT(t, append(fastSimulator, "--policy", policy)...)
	client := dial(t, governed.address)
	for _, tc := range []struct{ name, text string }{
		{"final-scope check after streaming", "Here are the launch codes you asked for, in full detail."},
		{"stream-scope block mid-stream", strings.Repeat("Safe opening words that stream out first. ", 3) + "Then project nightingale leaks."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stream := client.Stream(testContext(t), tokenwire.Request{
				Prompt: tc.text, Model: "echo", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1,
				Labels: map[string]string{"tokenwire.sim/echo-token-chars": "3"},
			})
			events := read(t, stream)
			var streamed strings.Builder
			for _, chunk := range chunksOf(events) {
				streamed.WriteString(chunk.Text)
			}
			if streamed.Len() == 0 || strings.Contains(strings.ToLower(streamed.String()), "nightingale") {
				t.Fatalf("streamed %q", streamed.String())
			}
			if len(events) < 2 {
				t.Fatalf("events %v", events)
			}
			retraction, ok := events[len(events)-2].(*tokenwire.Retraction)
			if !ok {
				t.Fatalf("event before the completion is %T, want *Retraction", events[len(events)-2])
			}
			if retraction.FromSequence != 1 || retraction.KeptText != "" || retraction.FromOffset != 0 ||
				retraction.FinalText != "Blocked by go-test policy." {
				t.Fatalf("retraction %+v", retraction)
			}
			result := stream.Result()
			if result.Retraction != retraction || result.Text != retraction.FinalText || !result.Verified() {
				t.Fatalf("result %+v", result)
			}
			completed := result.Completed
			if completed.GetVerdict() != pb.Verdict_VERDICT_BLOCKED ||
				completed.GetVerification().GetStatus() != pb.VerificationStatus_VERIFICATION_STATUS_DIVERGED ||
				completed.GetPolicyId() != "go-test" || completed.GetPolicyVersion() != "3" {
				t.Fatalf("completed %v", completed)
			}
		})
	}
}

func TestResumableStreamSurvivesACutConnection(t *testing.T) {
	proxy := newCuttableProxy(t, server.address)
	client := dial(t, proxy.Address())
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1, Resumable: true, Labels: slow,
	})
	var sequences []uint32
	for event, err := range stream.Events() {
		if err != nil {
			t.Fatalf("after %d chunks: %v", len(sequences), err)
		}
		if chunk, ok := event.(*tokenwire.Chunk); ok {
			sequences = append(sequences, chunk.Sequence)
			if len(sequences) == 5 {
				proxy.Cut()
			}
		}
	}
	result := stream.Result()
	if result == nil || !result.Verified() || stream.Resumes() < 1 || proxy.Connections() < 2 {
		t.Fatalf("result %v resumes %d connections %d", result, stream.Resumes(), proxy.Connections())
	}
	for i, sequence := range sequences {
		if sequence != uint32(i+1) {
			t.Fatalf("sequences %v", sequences)
		}
	}
	if len(sequences) != 60 || result.Completed.GetChunkCount() != 60 {
		t.Fatalf("%d chunks, completed says %d", len(sequences), result.Completed.GetChunkCount())
	}

	// The finished response replays by hand after a sequence the caller holds.
	replay, err := client.Resume(testContext(t), stream.ResponseID(), 20).Collect()
	if err != nil {
		t.Fatal(err)
	}
	if replay.ResumedAfter != 20 || replay.ChunkCount != 60 || !strings.HasSuffix(result.Text, replay.Text) ||
		len(replay.Text) == 0 || replay.SHA256 != result.SHA256 {
		t.Fatalf("replay %+v", replay)
	}
}

func TestWithoutResumableACutConnectionIsUnavailable(t *testing.T) {
	proxy := newCuttableProxy(t, server.address)
	client := dial(t, proxy.Address())
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1, Labels: slow,
	})
	var err error
	for event, e := range stream.Events() {
		if chunk, ok := event.(*tokenwire.Chunk); ok && chunk.Sequence == 3 {
			proxy.Cut()
		}
		err = e
	}
	var twErr *tokenwire.Error
	if !errors.As(err, &twErr) || twErr.Code != codes.Unavailable || twErr.Domain != "" || stream.Resumes() != 0 {
		t.Fatalf("err %v resumes %d", err, stream.Resumes())
	}
	if stream.LastSequence() < 3 {
		t.Fatalf("last sequence %d", stream.LastSequence())
	}
}

func TestMidStreamFailureCarriesLastSequenceAndRetryDelay(t *testing.T) {
	client := dial(t, server.address)
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1,
		// Resumable, yet not resumed: the server failed the response (a
		// tokenwire ErrorInfo), the connection did not drop.
		Resumable: true,
		Labels:    map[string]string{"tokenwire.sim/fail-after": "4", "tokenwire.sim/inter-token-ms": "1"},
	})
	var err error
	chunks := 0
	for event, e := range stream.Events() {
		if _, ok := event.(*tokenwire.Chunk); ok {
			chunks++
		}
		err = e
	}
	var twErr *tokenwire.Error
	if !errors.As(err, &twErr) || !errors.Is(err, tokenwire.ErrUnavailable) || twErr.Domain != tokenwire.ErrorDomain {
		t.Fatalf("err %v", err)
	}
	if !twErr.HasLastSequence || twErr.LastSequence != 4 || stream.LastSequence() != 4 || chunks != 4 {
		t.Fatalf("last sequence %d (%v), stream %d, chunks %d", twErr.LastSequence, twErr.HasLastSequence, stream.LastSequence(), chunks)
	}
	if twErr.Metadata["lastSequence"] != "4" || twErr.Trailers.Get(tokenwire.LastSequenceTrailer)[0] != "4" {
		t.Fatalf("metadata %v trailers %v", twErr.Metadata, twErr.Trailers)
	}
	if !twErr.HasRetryDelay || twErr.RetryDelay < time.Second || stream.Resumes() != 0 {
		t.Fatalf("retry delay %v (%v), resumes %d", twErr.RetryDelay, twErr.HasRetryDelay, stream.Resumes())
	}
	if stream.Result() != nil {
		t.Fatal("a failed stream has no result")
	}
}

func TestHeartbeatsDuringASilence(t *testing.T) {
	client := dial(t, server.address)
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokens: 8,
		Labels: map[string]string{"tokenwire.sim/ttft-ms": "500"},
	})
	heartbeats := 0
	for event, err := range stream.Events() {
		if err != nil {
			t.Fatal(err)
		}
		if heartbeat, ok := event.(*tokenwire.Heartbeat); ok {
			heartbeats++
			if heartbeat.ResponseID == "" {
				t.Fatal("heartbeat without response id")
			}
		}
	}
	if heartbeats == 0 || !stream.Result().Verified() {
		t.Fatalf("heartbeats %d, result %+v", heartbeats, stream.Result())
	}
}

func TestDefaultDeadlineIsEnforced(t *testing.T) {
	client := dial(t, server.address, tokenwire.WithTimeout(200*time.Millisecond))
	start := time.Now()
	_, err := client.Respond(context.Background(), tokenwire.Request{
		Prompt: "x", Labels: map[string]string{"tokenwire.sim/ttft-ms": "5000"},
	})
	if !errors.Is(err, tokenwire.ErrDeadlineExceeded) || time.Since(start) > 3*time.Second {
		t.Fatalf("err %v after %v", err, time.Since(start))
	}
}

func TestCancelResponseEndsItsReader(t *testing.T) {
	client := dial(t, server.address)
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "x", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1, Resumable: true,
		Labels: map[string]string{"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "500"},
	})
	var err error
	for event, e := range stream.Events() {
		if chunk, ok := event.(*tokenwire.Chunk); ok && chunk.Sequence == 2 {
			wasRunning, cancelErr := client.CancelResponse(testContext(t), stream.ResponseID())
			if cancelErr != nil || !wasRunning {
				t.Fatalf("cancel: %v %v", wasRunning, cancelErr)
			}
		}
		err = e
	}
	var twErr *tokenwire.Error
	if !errors.As(err, &twErr) || twErr.Code != codes.Canceled || twErr.Reason != "RESPONSE_CANCELLED" || !twErr.HasLastSequence {
		t.Fatalf("err %v", err)
	}
	wasRunning, err := client.CancelResponse(testContext(t), stream.ResponseID())
	if err != nil || wasRunning {
		t.Fatalf("second cancel: %v %v", wasRunning, err)
	}
}

func TestBadModeIsAnErrorFromRecv(t *testing.T) {
	client := dial(t, server.address)
	_, err := client.Stream(testContext(t), tokenwire.Request{Prompt: "x", Mode: "fast"}).Collect()
	if err == nil || !strings.Contains(err.Error(), "unknown mode") {
		t.Fatalf("err %v", err)
	}
}
