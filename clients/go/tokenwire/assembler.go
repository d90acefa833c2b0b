package tokenwire

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"sort"
	"time"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
)

// Event is one thing a stream reader sees: *Chunk, *ToolCallFragment,
// *Heartbeat, *Retraction or *Completion (always the last).
type Event interface{ isEvent() }

// Chunk is a piece of governed text, in order.
type Chunk struct {
	Sequence   uint32
	Text       string
	TextOffset uint32
	TokenCount uint32
	Message    *pb.TokenChunk
}

// ToolCall is a tool call: as assembled so far from its fragments, or as
// Completed reports it (Complete: the final, governed call). Arguments is
// JSON text. ID and Name come with a call's first fragment; a stream resumed
// by hand after it knows them only from Completed.
type ToolCall struct {
	Index     uint32
	ID        string
	Name      string
	Arguments string
	Complete  bool
}

// Unmarshal decodes the call's arguments into v (json.Unmarshal).
func (c ToolCall) Unmarshal(v any) error {
	if c.Arguments == "" {
		return json.Unmarshal([]byte("{}"), v)
	}
	return json.Unmarshal([]byte(c.Arguments), v)
}

// Proto is the call as the wire's ToolCall (for the next request's assistant turn).
func (c ToolCall) Proto() *pb.ToolCall {
	return &pb.ToolCall{Id: c.ID, Name: c.Name, Arguments: c.Arguments}
}

// ToolCallFragment is one piece of a tool call, in order: a chunk that
// carries no text. Arguments is this piece, at byte ArgumentsOffset of the
// call's arguments; Call is the call as held after it. ID and Name are set
// on a call's first fragment only.
type ToolCallFragment struct {
	Sequence        uint32
	Index           uint32
	ID              string
	Name            string
	Arguments       string
	ArgumentsOffset uint32
	Call            ToolCall
	Message         *pb.TokenChunk
}

// First reports whether this is the call's first fragment (it names the call).
func (f *ToolCallFragment) First() bool {
	return f.ArgumentsOffset == 0 && (f.Name != "" || f.ID != "")
}

// Heartbeat says the server is alive while generation is silent; it never
// changes the text.
type Heartbeat struct {
	ResponseID string
	Message    *pb.Heartbeat
}

// Retraction says the server's final payload differs from what was
// streamed: drop every chunk from FromSequence on (their text starts at
// byte FromOffset); FinalText replaces the whole answer. KeptText is what
// was streamed before FromSequence and is a prefix of FinalText.
type Retraction struct {
	FromSequence uint32
	FromOffset   int
	KeptText     string
	FinalText    string
	// The calls as held before FromSequence (fragments from it on are dropped too).
	KeptToolCalls []ToolCall
	// Completed.tool_calls: the calls that replace every call streamed.
	FinalToolCalls []ToolCall
}

// Completion is the last event of a stream.
type Completion struct {
	Result *Result
}

func (*Chunk) isEvent()            {}
func (*ToolCallFragment) isEvent() {}
func (*Heartbeat) isEvent()        {}
func (*Retraction) isEvent()       {}
func (*Completion) isEvent()       {}

// Result is the verified outcome of a call.
type Result struct {
	// The final text: the reassembled chunks, or the final payload after a
	// retraction (or of a unary call).
	Text string
	// Lower-case hex SHA-256 the server reported for the final payload.
	SHA256    string
	Completed *pb.Completed
	// Chunks received (0 for unary Respond).
	ChunkCount uint32
	// Non-nil when the server retracted streamed text.
	Retraction *Retraction
	// The request id (x-request-id header, else Completed.request_id).
	RequestID string
	// Non-zero when the stream was resumed by hand (Client.Resume) after
	// this sequence: Text then holds only what came after it (the server
	// still verified the whole).
	ResumedAfter uint32
	// The final, governed tool calls (Completed.tool_calls), each Complete.
	ToolCalls []ToolCall
}

// Checks is Completed.verification.checks: integrity, json_schema,
// tool_arguments and the validators.
func (r *Result) Checks() []*pb.VerificationCheck {
	return r.Completed.GetVerification().GetChecks()
}

// ChecksPassed is Completed.verification.checks_passed.
func (r *Result) ChecksPassed() bool { return r.Completed.GetVerification().GetChecksPassed() }

// Verified reports whether Text hashes to the server's SHA256.
func (r *Result) Verified() bool {
	sum := sha256.Sum256([]byte(r.Text))
	return hex.EncodeToString(sum[:]) == r.SHA256
}

// TimeToFirstToken is Completed.timing.time_to_first_token.
func (r *Result) TimeToFirstToken() time.Duration {
	return r.Completed.GetTiming().GetTimeToFirstToken().AsDuration()
}

// TotalTime is Completed.timing.total.
func (r *Result) TotalTime() time.Duration {
	return r.Completed.GetTiming().GetTotal().AsDuration()
}

// Assembler checks and reassembles the events of one response: sequences
// 1, 2, 3... with no gap or repeat, text offsets in UTF-8 bytes, one
// response id, the SHA-256 of the text against Completed, and a divergence
// turned into a Retraction. Streams use one internally; it is exported for
// callers that drive the generated stub themselves.
type Assembler struct {
	// RequestID, when set, is reported in the Result.
	RequestID string
	// Observe, when set, hears of each ordering violation (SequenceGap,
	// SequenceRepeat, OffsetMismatch, EventAfterCompleted) before Feed
	// returns it as a *ProtocolError. A Client's streams set it to count them.
	Observe func(kind ObservationKind, detail string)

	resumedAfter uint32
	parts        [][]byte
	nextSequence uint32
	nextOffset   int64 // -1: learnt from the first chunk (resumed by hand)
	digest       hash.Hash
	responseID   string
	result       *Result
	calls        map[uint32]*heldCall
}

// heldCall is a tool call's fragments as received.
type heldCall struct {
	index     uint32
	id, name  string
	start     int // byte of the arguments where the first fragment held here starts
	sequences []uint32
	parts     [][]byte
	size      int
}

func (h *heldCall) arguments(before uint32) []byte {
	var out []byte
	for i, data := range h.parts {
		if before == 0 || h.sequences[i] < before {
			out = append(out, data...)
		}
	}
	return out
}

func (h *heldCall) snapshot(before uint32) ToolCall {
	return ToolCall{Index: h.index, ID: h.id, Name: h.name, Arguments: string(h.arguments(before))}
}

func finalToolCalls(completed *pb.Completed) []ToolCall {
	var calls []ToolCall
	for i, call := range completed.GetToolCalls() {
		calls = append(calls, ToolCall{Index: uint32(i), ID: call.GetId(), Name: call.GetName(), Arguments: call.GetArguments(), Complete: true})
	}
	return calls
}

// NewAssembler returns an assembler for a whole response, or, with
// resumedAfter > 0, for the rest of a response whose chunks 1..resumedAfter
// the caller already holds.
func NewAssembler(resumedAfter uint32) *Assembler {
	a := &Assembler{resumedAfter: resumedAfter, nextSequence: resumedAfter + 1, digest: sha256.New(), calls: map[uint32]*heldCall{}}
	if resumedAfter > 0 {
		a.nextOffset = -1
	}
	return a
}

// LastSequence is the last sequence received in order (0 before any).
func (a *Assembler) LastSequence() uint32 { return a.nextSequence - 1 }

// ResponseID is the response's id once a chunk or heartbeat named it.
func (a *Assembler) ResponseID() string { return a.responseID }

// Result is the verified result once Completed arrived, else nil.
func (a *Assembler) Result() *Result { return a.result }

// Text is the text held so far (the final text once completed).
func (a *Assembler) Text() string {
	if a.result != nil {
		return a.result.Text
	}
	return string(bytes.Join(a.parts, nil))
}

// ToolCalls are the tool calls held so far, by index, with their arguments
// as far as they came; once completed, the final calls from Completed.
func (a *Assembler) ToolCalls() []ToolCall {
	if a.result != nil {
		return append([]ToolCall(nil), a.result.ToolCalls...)
	}
	var calls []ToolCall
	for _, index := range a.callIndexes() {
		calls = append(calls, a.calls[index].snapshot(0))
	}
	return calls
}

func (a *Assembler) callIndexes() []uint32 {
	indexes := make([]uint32, 0, len(a.calls))
	for index := range a.calls {
		indexes = append(indexes, index)
	}
	sort.Slice(indexes, func(i, j int) bool { return indexes[i] < indexes[j] })
	return indexes
}

// ResumeRequest is the request that continues this response after what the
// assembler holds.
func (a *Assembler) ResumeRequest() *pb.StreamRespondRequest {
	return &pb.StreamRespondRequest{
		Resume: &pb.ResumeFrom{ResponseId: a.responseID, AfterSequence: a.LastSequence()},
	}
}

// Feed takes one wire event and returns the events a caller should see, or
// a *ProtocolError / *IntegrityError when the server broke the contract.
func (a *Assembler) Feed(message *pb.StreamRespondResponse) ([]Event, error) {
	if a.result != nil {
		return nil, a.violation(EventAfterCompleted, "event after Completed")
	}
	switch event := message.GetEvent().(type) {
	case *pb.StreamRespondResponse_Chunk:
		if event.Chunk.GetToolCall() != nil {
			fragment, err := a.fragment(event.Chunk)
			if err != nil {
				return nil, err
			}
			return []Event{fragment}, nil
		}
		chunk, err := a.chunk(event.Chunk)
		if err != nil {
			return nil, err
		}
		return []Event{chunk}, nil
	case *pb.StreamRespondResponse_Heartbeat:
		if a.responseID == "" {
			a.responseID = event.Heartbeat.GetResponseId()
		}
		return []Event{&Heartbeat{ResponseID: event.Heartbeat.GetResponseId(), Message: event.Heartbeat}}, nil
	case *pb.StreamRespondResponse_Completed:
		return a.completed(event.Completed)
	default:
		return nil, protocolError(a.LastSequence(), "unknown event %T", event)
	}
}

// place checks a chunk's response id, sequence and text offset (text or fragment).
func (a *Assembler) place(chunk *pb.TokenChunk) error {
	if a.responseID != "" && chunk.GetResponseId() != a.responseID {
		return protocolError(a.LastSequence(), "chunk of response %s inside %s", chunk.GetResponseId(), a.responseID)
	}
	if a.nextOffset == -1 {
		a.nextOffset = int64(chunk.GetTextOffset())
	}
	if chunk.GetSequence() != a.nextSequence || int64(chunk.GetTextOffset()) != a.nextOffset {
		kind := OffsetMismatch
		if chunk.GetSequence() > a.nextSequence {
			kind = SequenceGap
		} else if chunk.GetSequence() < a.nextSequence {
			kind = SequenceRepeat
		}
		return a.violation(kind, "expected chunk %d at byte %d, got %d at byte %d",
			a.nextSequence, a.nextOffset, chunk.GetSequence(), chunk.GetTextOffset())
	}
	return nil
}

func (a *Assembler) chunk(chunk *pb.TokenChunk) (*Chunk, error) {
	if err := a.place(chunk); err != nil {
		return nil, err
	}
	a.responseID = chunk.GetResponseId()
	data := []byte(chunk.GetText())
	a.parts = append(a.parts, data)
	a.digest.Write(data)
	a.nextSequence++
	a.nextOffset += int64(len(data))
	return &Chunk{
		Sequence:   chunk.GetSequence(),
		Text:       chunk.GetText(),
		TextOffset: chunk.GetTextOffset(),
		TokenCount: chunk.GetTokenCount(),
		Message:    chunk,
	}, nil
}

// fragment takes a tool-call fragment: in sequence like a chunk, at the text
// offset (which it does not advance), and at its call's arguments_offset.
func (a *Assembler) fragment(chunk *pb.TokenChunk) (*ToolCallFragment, error) {
	if err := a.place(chunk); err != nil {
		return nil, err
	}
	delta := chunk.GetToolCall()
	last := a.LastSequence()
	if chunk.GetText() != "" {
		return nil, protocolError(last, "chunk %d carries both text and a tool-call fragment", chunk.GetSequence())
	}
	call := a.calls[delta.GetIndex()]
	if call == nil {
		// Calls are numbered in the order they begin; a stream resumed by hand
		// may begin inside any call (the earlier ones are the caller's).
		if a.resumedAfter == 0 && int(delta.GetIndex()) != len(a.calls) {
			return nil, protocolError(last, "tool call #%d begins before #%d", delta.GetIndex(), len(a.calls))
		}
		call = &heldCall{index: delta.GetIndex()}
		if a.resumedAfter > 0 {
			call.start = int(delta.GetArgumentsOffset())
		}
	}
	if expected := call.start + call.size; int(delta.GetArgumentsOffset()) != expected {
		return nil, a.violation(OffsetMismatch, "expected tool call #%d arguments at byte %d, got chunk %d at byte %d",
			delta.GetIndex(), expected, chunk.GetSequence(), delta.GetArgumentsOffset())
	}
	if call.id != "" && delta.GetId() != "" && call.id != delta.GetId() {
		return nil, protocolError(last, "tool call #%d id %q in chunk %d, was %q", delta.GetIndex(), delta.GetId(), chunk.GetSequence(), call.id)
	}
	if call.name != "" && delta.GetName() != "" && call.name != delta.GetName() {
		return nil, protocolError(last, "tool call #%d name %q in chunk %d, was %q", delta.GetIndex(), delta.GetName(), chunk.GetSequence(), call.name)
	}
	if call.id == "" {
		call.id = delta.GetId()
	}
	if call.name == "" {
		call.name = delta.GetName()
	}
	a.calls[delta.GetIndex()] = call
	a.responseID = chunk.GetResponseId()
	data := []byte(delta.GetArguments())
	call.sequences = append(call.sequences, chunk.GetSequence())
	call.parts = append(call.parts, data)
	call.size += len(data)
	// A fragment holds no text: an empty part keeps parts indexed by sequence.
	a.parts = append(a.parts, nil)
	a.nextSequence++
	return &ToolCallFragment{
		Sequence: chunk.GetSequence(), Index: delta.GetIndex(), ID: delta.GetId(), Name: delta.GetName(),
		Arguments: delta.GetArguments(), ArgumentsOffset: delta.GetArgumentsOffset(),
		Call: call.snapshot(0), Message: chunk,
	}, nil
}

// checkCalls holds each call (its fragments before `before`, or all with 0)
// against the final call of its index: equal, or with a retraction a prefix.
func (a *Assembler) checkCalls(final []ToolCall, before uint32) error {
	last := a.LastSequence()
	finals := map[uint32]ToolCall{}
	for _, call := range final {
		finals[call.Index] = call
	}
	for _, index := range a.callIndexes() {
		held := a.calls[index]
		if before != 0 && held.sequences[0] >= before {
			continue // every fragment of it was retracted
		}
		target, ok := finals[index]
		if !ok {
			return integrityError(last, "tool call #%d was streamed but is not in Completed.tool_calls", index)
		}
		if (held.id != "" && held.id != target.ID) || (held.name != "" && held.name != target.Name) {
			return integrityError(last, "tool call #%d streamed as %s %s, Completed says %s %s", index, held.id, held.name, target.ID, target.Name)
		}
		arguments := held.arguments(before)
		if before == 0 && !bytes.Equal(arguments, []byte(target.Arguments)) {
			return integrityError(last, "tool call #%d: its fragments differ from its final arguments", index)
		}
		if before != 0 && !bytes.HasPrefix([]byte(target.Arguments), arguments) {
			return integrityError(last, "tool call #%d: fragments before %d are not a prefix of its final arguments", index, before)
		}
	}
	if before == 0 {
		for _, call := range final {
			if a.calls[call.Index] == nil {
				return integrityError(last, "tool call #%d is in Completed but was never streamed", call.Index)
			}
		}
	}
	return nil
}

// violation tells Observe of an ordering violation and returns it as a *ProtocolError.
func (a *Assembler) violation(kind ObservationKind, format string, args ...any) error {
	err := &ProtocolError{Message: fmt.Sprintf(format, args...), LastSequence: a.LastSequence()}
	if a.Observe != nil {
		a.Observe(kind, err.Message)
	}
	return err
}

func sha256Hex(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

func (a *Assembler) completed(completed *pb.Completed) ([]Event, error) {
	last := a.LastSequence()
	if completed.GetLastSequence() > last {
		return nil, a.violation(SequenceGap, "Completed names last sequence %d, received %d", completed.GetLastSequence(), last)
	}
	if completed.GetLastSequence() != last {
		return nil, protocolError(last, "Completed names last sequence %d, received %d", completed.GetLastSequence(), last)
	}
	if a.responseID != "" && completed.GetResponseId() != a.responseID {
		return nil, protocolError(last, "Completed of response %s ends %s", completed.GetResponseId(), a.responseID)
	}
	if completed.GetChunkCount() != last {
		return nil, protocolError(last, "Completed counts %d chunks, received %d", completed.GetChunkCount(), last)
	}
	if a.responseID == "" {
		a.responseID = completed.GetResponseId()
	}
	requestID := a.RequestID
	if requestID == "" {
		requestID = completed.GetRequestId()
	}
	status := completed.GetVerification().GetStatus()
	received := bytes.Join(a.parts, nil)
	if a.resumedAfter > 0 {
		if status != pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED && status != pb.VerificationStatus_VERIFICATION_STATUS_DIVERGED {
			return nil, protocolError(last, "Completed without a verification result (%v)", status)
		}
		a.result = &Result{
			Text: string(received), SHA256: completed.GetFinalSha256(), Completed: completed,
			ChunkCount: last, RequestID: requestID, ResumedAfter: a.resumedAfter,
			ToolCalls: finalToolCalls(completed),
		}
		return []Event{&Completion{Result: a.result}}, nil
	}
	var events []Event
	var text string
	var retraction *Retraction
	finalCalls := finalToolCalls(completed)
	switch status {
	case pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED:
		streamed := hex.EncodeToString(a.digest.Sum(nil))
		if streamed != completed.GetFinalSha256() {
			return nil, integrityError(last, "received text hashes to %s, server says %s", streamed, completed.GetFinalSha256())
		}
		text = string(received)
		if completed.GetFinalText() != "" && completed.GetFinalText() != text {
			return nil, integrityError(last, "final_text differs from the verified stream")
		}
		if len(finalCalls) > 0 || len(a.calls) == 0 {
			if err := a.checkCalls(finalCalls, 0); err != nil {
				return nil, err
			}
		} else {
			// Completed without its calls (as final_text may be omitted): the
			// verified fragments are the calls.
			for _, call := range a.ToolCalls() {
				call.Complete = true
				finalCalls = append(finalCalls, call)
			}
		}
	case pb.VerificationStatus_VERIFICATION_STATUS_DIVERGED:
		text = completed.GetFinalText()
		if sha256Hex([]byte(text)) != completed.GetFinalSha256() {
			return nil, integrityError(last, "final_text does not hash to final_sha256")
		}
		from := completed.GetVerification().GetRetractFromSequence()
		if from < 1 || from > a.nextSequence {
			return nil, protocolError(last, "retraction from unknown sequence %d", from)
		}
		kept := bytes.Join(a.parts[:from-1], nil)
		if !bytes.HasPrefix([]byte(text), kept) {
			return nil, integrityError(last, "chunks before %d are not a prefix of the final text", from)
		}
		if err := a.checkCalls(finalCalls, from); err != nil {
			return nil, err
		}
		var keptCalls []ToolCall
		for _, index := range a.callIndexes() {
			if held := a.calls[index]; held.sequences[0] < from {
				keptCalls = append(keptCalls, held.snapshot(from))
			}
		}
		retraction = &Retraction{
			FromSequence: from, FromOffset: len(kept), KeptText: string(kept), FinalText: text,
			KeptToolCalls: keptCalls, FinalToolCalls: finalCalls,
		}
		events = append(events, retraction)
	default:
		return nil, protocolError(last, "Completed without a verification result (%v)", status)
	}
	a.result = &Result{
		Text: text, SHA256: completed.GetFinalSha256(), Completed: completed,
		ChunkCount: last, Retraction: retraction, RequestID: requestID, ToolCalls: finalCalls,
	}
	return append(events, &Completion{Result: a.result}), nil
}

// unaryResult checks a unary payload against its digest and verification.
func unaryResult(response *pb.RespondResponse, requestID string) (*Result, error) {
	completed := response.GetCompleted()
	if completed == nil {
		return nil, protocolError(0, "RespondResponse without completed")
	}
	if completed.GetVerification().GetStatus() != pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED {
		return nil, protocolError(0, "unary payload is not verified")
	}
	text := completed.GetFinalText()
	if digest := sha256Hex([]byte(text)); digest != completed.GetFinalSha256() {
		return nil, integrityError(0, "payload hashes to %s, server says %s", digest, completed.GetFinalSha256())
	}
	if requestID == "" {
		requestID = completed.GetRequestId()
	}
	return &Result{
		Text: text, SHA256: completed.GetFinalSha256(), Completed: completed, RequestID: requestID,
		ToolCalls: finalToolCalls(completed),
	}, nil
}
