package tokenwire

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"time"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
)

// Event is one thing a stream reader sees: *Chunk, *Heartbeat, *Retraction
// or *Completion (always the last).
type Event interface{ isEvent() }

// Chunk is a piece of governed text, in order.
type Chunk struct {
	Sequence   uint32
	Text       string
	TextOffset uint32
	TokenCount uint32
	Message    *pb.TokenChunk
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
}

// Completion is the last event of a stream.
type Completion struct {
	Result *Result
}

func (*Chunk) isEvent()      {}
func (*Heartbeat) isEvent()  {}
func (*Retraction) isEvent() {}
func (*Completion) isEvent() {}

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
}

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
}

// NewAssembler returns an assembler for a whole response, or, with
// resumedAfter > 0, for the rest of a response whose chunks 1..resumedAfter
// the caller already holds.
func NewAssembler(resumedAfter uint32) *Assembler {
	a := &Assembler{resumedAfter: resumedAfter, nextSequence: resumedAfter + 1, digest: sha256.New()}
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

func (a *Assembler) chunk(chunk *pb.TokenChunk) (*Chunk, error) {
	if a.responseID != "" && chunk.GetResponseId() != a.responseID {
		return nil, protocolError(a.LastSequence(), "chunk of response %s inside %s", chunk.GetResponseId(), a.responseID)
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
		return nil, a.violation(kind, "expected chunk %d at byte %d, got %d at byte %d",
			a.nextSequence, a.nextOffset, chunk.GetSequence(), chunk.GetTextOffset())
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
		}
		return []Event{&Completion{Result: a.result}}, nil
	}
	var events []Event
	var text string
	var retraction *Retraction
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
		retraction = &Retraction{FromSequence: from, FromOffset: len(kept), KeptText: string(kept), FinalText: text}
		events = append(events, retraction)
	default:
		return nil, protocolError(last, "Completed without a verification result (%v)", status)
	}
	a.result = &Result{
		Text: text, SHA256: completed.GetFinalSha256(), Completed: completed,
		ChunkCount: last, Retraction: retraction, RequestID: requestID,
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
	return &Result{Text: text, SHA256: completed.GetFinalSha256(), Completed: completed, RequestID: requestID}, nil
}
