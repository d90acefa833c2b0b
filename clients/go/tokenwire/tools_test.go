package tokenwire_test

import (
	"crypto/sha256"
	"encoding/hex"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

// piece is a text chunk (call < 0) or a fragment of tool call number call.
type piece struct {
	call int
	text string
}

func text(s string) piece              { return piece{call: -1, text: s} }
func frag(call int, args string) piece { return piece{call: call, text: args} }

var callNames = map[int][2]string{0: {"call_0", "get_weather"}, 1: {"call_1", "get_time"}}

// pieces: text, then call #0 in three fragments with call #1 between them, then text.
var pieces = []piece{
	text("Let me "), text("check. "),
	frag(0, `{"city": `), frag(1, `{"tz": "CET"}`), frag(0, `"Paris", `), frag(0, `"unit": "°C"}`),
	text("Done."),
}

// toolScript is the chunks of ps with the sequences and offsets a correct server sends.
func toolScript(ps []piece) []*pb.StreamRespondResponse {
	var out []*pb.StreamRespondResponse
	textOffset := uint32(0)
	held := map[int]uint32{}
	for i, p := range ps {
		chunk := &pb.TokenChunk{ResponseId: "r", Sequence: uint32(i + 1), TextOffset: textOffset}
		if p.call < 0 {
			chunk.Text = p.text
			textOffset += uint32(len(p.text))
		} else {
			offset, seen := held[p.call]
			delta := &pb.ToolCallDelta{Index: uint32(p.call), Arguments: p.text, ArgumentsOffset: offset}
			if !seen {
				delta.Id, delta.Name = callNames[p.call][0], callNames[p.call][1]
			}
			held[p.call] = offset + uint32(len(p.text))
			chunk.ToolCall = delta
		}
		out = append(out, &pb.StreamRespondResponse{Event: &pb.StreamRespondResponse_Chunk{Chunk: chunk}})
	}
	return out
}

func finalCalls(ps []piece) []*pb.ToolCall {
	args := map[int]string{}
	for _, p := range ps {
		if p.call >= 0 {
			args[p.call] += p.text
		}
	}
	var calls []*pb.ToolCall
	for i := 0; i < len(args); i++ {
		calls = append(calls, &pb.ToolCall{Id: callNames[i][0], Name: callNames[i][1], Arguments: args[i]})
	}
	return calls
}

func toolCompleted(ps []piece, final string, calls []*pb.ToolCall, retractFrom uint32) *pb.StreamRespondResponse {
	var streamed strings.Builder
	for _, p := range ps {
		if p.call < 0 {
			streamed.WriteString(p.text)
		}
	}
	if final == "" {
		final = streamed.String()
	}
	sum := sha256.Sum256([]byte(final))
	status := pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED
	if retractFrom > 0 {
		status = pb.VerificationStatus_VERIFICATION_STATUS_DIVERGED
	}
	return &pb.StreamRespondResponse{Event: &pb.StreamRespondResponse_Completed{Completed: &pb.Completed{
		ResponseId: "r", FinalText: final, FinalSha256: hex.EncodeToString(sum[:]),
		ChunkCount: uint32(len(ps)), LastSequence: uint32(len(ps)), ToolCalls: calls,
		FinishReason: pb.FinishReason_FINISH_REASON_TOOL_CALLS,
		Verification: &pb.Verification{Status: status, RetractFromSequence: retractFrom},
	}}}
}

func fragmentMessage(sequence, index uint32, args string, offset, textOffset uint32) *pb.StreamRespondResponse {
	return &pb.StreamRespondResponse{Event: &pb.StreamRespondResponse_Chunk{Chunk: &pb.TokenChunk{
		ResponseId: "r", Sequence: sequence, TextOffset: textOffset,
		ToolCall: &pb.ToolCallDelta{Index: index, Arguments: args, ArgumentsOffset: offset},
	}}}
}

func TestFragmentsAssembleIntoCallsNextToTheText(t *testing.T) {
	a := tokenwire.NewAssembler(0)
	var events []tokenwire.Event
	for i, message := range toolScript(pieces) {
		got, err := a.Feed(message)
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, got...)
		if i == 4 {
			want := []tokenwire.ToolCall{
				{Index: 0, ID: "call_0", Name: "get_weather", Arguments: `{"city": "Paris", `},
				{Index: 1, ID: "call_1", Name: "get_time", Arguments: `{"tz": "CET"}`},
			}
			if !reflect.DeepEqual(a.ToolCalls(), want) {
				t.Fatalf("after chunk 5: %+v", a.ToolCalls())
			}
			if a.Text() != "Let me check. " {
				t.Fatalf("text %q", a.Text())
			}
		}
	}
	var offsets []uint32
	for _, event := range events {
		if f, ok := event.(*tokenwire.ToolCallFragment); ok {
			offsets = append(offsets, f.ArgumentsOffset)
			if f.First() != (f.ArgumentsOffset == 0) {
				t.Fatalf("First() of %+v", f)
			}
		}
	}
	if !reflect.DeepEqual(offsets, []uint32{0, 0, 9, 18}) {
		t.Fatalf("arguments offsets %v", offsets)
	}
	if last := events[len(events)-1].(*tokenwire.Chunk); last.TextOffset != uint32(len("Let me check. ")) {
		t.Fatalf("text after the calls at %d", last.TextOffset)
	}
	done, err := a.Feed(toolCompleted(pieces, "", finalCalls(pieces), 0))
	if err != nil {
		t.Fatal(err)
	}
	result := done[len(done)-1].(*tokenwire.Completion).Result
	if !result.Verified() || result.Text != "Let me check. Done." || len(result.ToolCalls) != 2 {
		t.Fatalf("result %+v", result)
	}
	first := result.ToolCalls[0]
	if !first.Complete || first.Arguments != `{"city": "Paris", "unit": "°C"}` || first.Name != "get_weather" {
		t.Fatalf("call %+v", first)
	}
	var args struct{ City, Unit string }
	if err := first.Unmarshal(&args); err != nil || args.City != "Paris" {
		t.Fatalf("arguments %+v %v", args, err)
	}
}

func TestAMisplacedFragmentIsAnOrderingViolation(t *testing.T) {
	cases := []struct {
		name string
		bad  *pb.StreamRespondResponse
		kind tokenwire.ObservationKind
	}{
		{"arguments gap", fragmentMessage(4, 0, `"x"}`, 20, 14), tokenwire.OffsetMismatch},
		{"arguments overlap", fragmentMessage(4, 0, `"x"}`, 3, 14), tokenwire.OffsetMismatch},
		{"text offset advanced by a fragment", fragmentMessage(4, 0, `"x"}`, 9, 23), tokenwire.OffsetMismatch},
		{"sequence gap", fragmentMessage(5, 0, `"x"}`, 9, 14), tokenwire.SequenceGap},
		{"replayed fragment", toolScript(pieces)[2], tokenwire.SequenceRepeat},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var heard []tokenwire.ObservationKind
			a := tokenwire.NewAssembler(0)
			a.Observe = func(kind tokenwire.ObservationKind, _ string) { heard = append(heard, kind) }
			if _, err := feed(t, a, toolScript(pieces)[:3]...); err != nil {
				t.Fatal(err)
			}
			_, err := a.Feed(c.bad)
			wantProtocolError(t, err, false)
			if !reflect.DeepEqual(heard, []tokenwire.ObservationKind{c.kind}) {
				t.Fatalf("heard %v, want %v", heard, c.kind)
			}
		})
	}
}

func TestFragmentsThatBreakTheShapeAreProtocolErrors(t *testing.T) {
	both := fragmentMessage(1, 0, "{}", 0, 0)
	both.GetChunk().Text = "hi"
	_, err := tokenwire.NewAssembler(0).Feed(both)
	wantProtocolError(t, err, false)
	_, err = tokenwire.NewAssembler(0).Feed(fragmentMessage(1, 1, "{}", 0, 0))
	wantProtocolError(t, err, false)
}

func TestVerifiedCallsMustEqualTheirFragments(t *testing.T) {
	calls := finalCalls(pieces)
	calls[0].Arguments = `{"city": "Lyon"}`
	_, err := feed(t, tokenwire.NewAssembler(0), append(toolScript(pieces), toolCompleted(pieces, "", calls, 0))...)
	wantProtocolError(t, err, true)
}

func TestARetractionDropsFragmentsAndCompletedCallsReplaceThem(t *testing.T) {
	final := finalCalls(pieces)
	final[0].Arguments = `{"city": "[CITY]", "unit": "°C"}`
	events, err := feed(t, tokenwire.NewAssembler(0), append(toolScript(pieces), toolCompleted(pieces, "", final, 5))...)
	if err != nil {
		t.Fatal(err)
	}
	var retraction *tokenwire.Retraction
	for _, event := range events {
		if r, ok := event.(*tokenwire.Retraction); ok {
			retraction = r
		}
	}
	if retraction == nil || retraction.FromSequence != 5 || retraction.KeptText != "Let me check. " {
		t.Fatalf("retraction %+v", retraction)
	}
	kept := []tokenwire.ToolCall{
		{Index: 0, ID: "call_0", Name: "get_weather", Arguments: `{"city": `},
		{Index: 1, ID: "call_1", Name: "get_time", Arguments: `{"tz": "CET"}`},
	}
	if !reflect.DeepEqual(retraction.KeptToolCalls, kept) {
		t.Fatalf("kept %+v", retraction.KeptToolCalls)
	}
	result := events[len(events)-1].(*tokenwire.Completion).Result
	if result.ToolCalls[0].Arguments != final[0].Arguments || !result.ToolCalls[0].Complete {
		t.Fatalf("final calls %+v", result.ToolCalls)
	}

	bad := finalCalls(pieces)
	bad[0].Arguments = `{"town": "Paris"}`
	_, err = feed(t, tokenwire.NewAssembler(0), append(toolScript(pieces), toolCompleted(pieces, "", bad, 5))...)
	wantProtocolError(t, err, true)
}

func TestResumedByHandInsideACall(t *testing.T) {
	a := tokenwire.NewAssembler(4)
	if _, err := feed(t, a, toolScript(pieces)[4:]...); err != nil {
		t.Fatal(err)
	}
	if calls := a.ToolCalls(); len(calls) != 1 || calls[0].Arguments != `"Paris", "unit": "°C"}` {
		t.Fatalf("held %+v", calls)
	}
	events, err := a.Feed(toolCompleted(pieces, "", finalCalls(pieces), 0))
	if err != nil {
		t.Fatal(err)
	}
	result := events[len(events)-1].(*tokenwire.Completion).Result
	if result.ToolCalls[0].Arguments != `{"city": "Paris", "unit": "°C"}` || result.ResumedAfter != 4 {
		t.Fatalf("result %+v", result)
	}
}

// resumingFake drops the connection after the first `dropAfter` messages of
// the script, and replays from the resume point on the next call.
type resumingFake struct {
	pb.UnimplementedRespondServiceServer
	script    []*pb.StreamRespondResponse
	dropAfter int
	mu        sync.Mutex
	requests  []*pb.StreamRespondRequest
}

func (f *resumingFake) StreamRespond(request *pb.StreamRespondRequest, stream grpc.ServerStreamingServer[pb.StreamRespondResponse]) error {
	f.mu.Lock()
	f.requests = append(f.requests, request)
	f.mu.Unlock()
	messages := f.script[:f.dropAfter]
	if request.GetResume() != nil {
		messages = f.script[request.GetResume().GetAfterSequence():]
	}
	for _, message := range messages {
		if err := stream.Send(message); err != nil {
			return err
		}
	}
	if request.GetResume() == nil {
		return status.Error(codes.Unavailable, "connection reset")
	}
	return nil
}

func TestAResumedStreamContinuesInsideACall(t *testing.T) {
	fake := &resumingFake{
		script:    append(toolScript(pieces), toolCompleted(pieces, "", finalCalls(pieces), 0)),
		dropAfter: 5,
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	pb.RegisterRespondServiceServer(server, fake)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)

	client, err := tokenwire.Dial(listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	tools, err := tokenwire.ToolsFromJSON([]byte(`[
		{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "required": ["city"]}, "strict": true}},
		{"name": "get_time"}]`), false)
	if err != nil {
		t.Fatal(err)
	}
	schema, err := tokenwire.JSONSchemaFormat("answer", map[string]any{"type": "object", "minProperties": 1}, true)
	if err != nil {
		t.Fatal(err)
	}
	stream := client.Stream(testContext(t), tokenwire.Request{
		Prompt: "weather?", Resumable: true, Tools: tools, ToolChoice: tokenwire.ChooseTool("required"), ResponseFormat: schema,
	})
	result, err := stream.Collect()
	if err != nil {
		t.Fatal(err)
	}
	if stream.Resumes() != 1 || len(fake.requests) != 2 || fake.requests[1].GetResume().GetAfterSequence() != 5 {
		t.Fatalf("resumes %d, requests %v", stream.Resumes(), fake.requests)
	}
	if !result.Verified() || result.Text != "Let me check. Done." || len(stream.ToolCalls()) != 2 {
		t.Fatalf("result %+v", result)
	}
	if got := result.ToolCalls[0].Arguments; got != `{"city": "Paris", "unit": "°C"}` {
		t.Fatalf("call #0 %s", got)
	}
	sent := fake.requests[0]
	if len(sent.GetTools()) != 2 || !sent.GetTools()[0].GetStrict() || sent.GetTools()[1].GetStrict() ||
		sent.GetTools()[0].GetParameters().GetFields()["required"].GetListValue().GetValues()[0].GetStringValue() != "city" {
		t.Fatalf("tools %v", sent.GetTools())
	}
	if sent.GetToolChoice().GetMode() != pb.ToolChoiceMode_TOOL_CHOICE_MODE_REQUIRED {
		t.Fatalf("tool choice %v", sent.GetToolChoice())
	}
	if format := sent.GetResponseFormat(); format.GetType() != pb.ResponseFormatType_RESPONSE_FORMAT_TYPE_JSON_SCHEMA ||
		format.GetSchemaName() != "answer" || !format.GetStrict() || format.GetJsonSchema().GetFields()["minProperties"].GetNumberValue() != 1 {
		t.Fatalf("response format %v", format)
	}
}

func TestToolHelpers(t *testing.T) {
	if choice := tokenwire.ChooseTool("get_weather"); choice.GetFunctionName() != "get_weather" {
		t.Fatalf("choice %v", choice)
	}
	if _, err := tokenwire.ToolsFromJSON([]byte(`[{"description": "nameless"}]`), false); err == nil {
		t.Fatal("a nameless tool was accepted")
	}
	if _, err := tokenwire.ToolsFromJSON([]byte(`[{"type": "retrieval", "function": {"name": "x"}}]`), false); err == nil {
		t.Fatal("a non-function tool was accepted")
	}
	answer := tokenwire.ToolResultMessage("call_0", `{"temperature_c": 21}`)
	if answer.GetRole() != pb.Role_ROLE_TOOL || answer.GetToolCallId() != "call_0" {
		t.Fatalf("tool result %v", answer)
	}
	turn := tokenwire.AssistantMessage("", []tokenwire.ToolCall{{ID: "call_0", Name: "get_weather", Arguments: "{}"}})
	if turn.GetRole() != pb.Role_ROLE_ASSISTANT || turn.GetToolCalls()[0].GetId() != "call_0" {
		t.Fatalf("assistant turn %v", turn)
	}
	if format := tokenwire.JSONObjectFormat(false); format.GetType() != pb.ResponseFormatType_RESPONSE_FORMAT_TYPE_JSON_OBJECT {
		t.Fatalf("format %v", format)
	}
}
