package tokenwire

import (
	"context"
	"errors"
	"io"
	"iter"
	"time"

	"google.golang.org/grpc"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
)

// Stream is an in-progress StreamRespond. Read it with Recv (io.EOF after
// the Completion), with Events (range over func), or with Collect.
//
// Every chunk is checked (sequence, offset, response id) and the text is
// verified against Completed; a broken promise is a *ProtocolError or
// *IntegrityError. A resumable stream (Request.Resumable) whose connection
// drops (UNAVAILABLE without a tokenwire ErrorInfo) reconnects with the last
// sequence it holds, within the deadline and the ResumePolicy, so the
// reader sees one seamless, verified stream.
//
// Recv is not safe for concurrent use; Close may be called from any goroutine.
type Stream struct {
	stub      pb.RespondServiceClient
	ctx       context.Context
	cancel    context.CancelFunc
	request   *pb.StreamRespondRequest
	assembler *Assembler
	resume    ResumePolicy

	call       grpc.ServerStreamingClient[pb.StreamRespondResponse]
	callCancel context.CancelFunc
	pending    []Event
	err        error // sticky: returned by every Recv after the first failure
	done       bool
	resumes    int
	stalls     *stallWatch // nil: stalls are not counted
}

// Recv returns the next event; io.EOF once the stream ended after its
// Completion; any other error ends the stream (and is returned again by
// later calls). The last event before io.EOF is always a *Completion.
func (s *Stream) Recv() (Event, error) {
	if len(s.pending) > 0 {
		event := s.pending[0]
		s.pending = s.pending[1:]
		return event, nil
	}
	if s.err != nil {
		return nil, s.err
	}
	if s.done {
		return nil, io.EOF
	}
	for {
		if s.call == nil {
			if err := s.open(); err != nil {
				return nil, s.fail(err)
			}
		}
		s.stalls.waiting(s.assembler.ResponseID(), s.assembler.LastSequence())
		message, err := s.call.Recv()
		s.stalls.stopped(err == nil)
		if errors.Is(err, io.EOF) {
			s.endCall()
			if s.assembler.Result() == nil {
				return nil, s.fail(protocolError(s.assembler.LastSequence(), "stream ended without Completed"))
			}
			s.done = true
			s.cancel()
			return nil, io.EOF
		}
		if err != nil {
			twErr := FromError(err, s.call.Trailer())
			s.endCall()
			if !s.shouldResume(twErr) {
				return nil, s.fail(twErr)
			}
			if err := s.backoff(); err != nil {
				return nil, s.fail(twErr)
			}
			s.request = s.assembler.ResumeRequest()
			continue
		}
		if s.assembler.RequestID == "" {
			if header, err := s.call.Header(); err == nil {
				s.assembler.RequestID = first(header, RequestIDHeader)
			}
		}
		events, err := s.assembler.Feed(message)
		if err != nil {
			// A caller that gets a broken stream must stop generation too.
			s.endCall()
			return nil, s.fail(err)
		}
		if len(events) == 0 {
			continue
		}
		s.pending = events[1:]
		return events[0], nil
	}
}

func (s *Stream) open() error {
	ctx, cancel := context.WithCancel(s.ctx)
	call, err := s.stub.StreamRespond(ctx, s.request)
	if err != nil {
		cancel()
		return FromError(err, nil)
	}
	s.call, s.callCancel = call, cancel
	return nil
}

// endCall cancels the current call (a no-op once it ended), so the server
// stops generating for a reader that went away.
func (s *Stream) endCall() {
	if s.callCancel != nil {
		s.callCancel()
	}
	s.call, s.callCancel = nil, nil
}

func (s *Stream) fail(err error) error {
	s.stalls.stopped(false)
	s.err = err
	s.pending = nil
	s.cancel()
	return err
}

func (s *Stream) shouldResume(err error) bool {
	if s.ctx.Err() != nil || s.resumes >= s.resume.Attempts || s.assembler.ResponseID() == "" || !worthResuming(err) {
		return false
	}
	deadline, ok := s.ctx.Deadline()
	return !ok || time.Now().Before(deadline)
}

// backoff waits before the next resume, within the deadline; an error when
// the stream was closed or its context ended meanwhile.
func (s *Stream) backoff() error {
	delay := s.resume.delay(s.resumes)
	s.resumes++
	if deadline, ok := s.ctx.Deadline(); ok {
		delay = min(delay, max(0, time.Until(deadline)))
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

// Events ranges over the stream: each event with a nil error, or one final
// non-nil error. Breaking out of the loop closes the stream.
func (s *Stream) Events() iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		defer s.Close()
		for {
			event, err := s.Recv()
			if errors.Is(err, io.EOF) {
				return
			}
			if !yield(event, err) || err != nil {
				return
			}
		}
	}
}

// Collect reads the stream to its end and returns the verified result.
func (s *Stream) Collect() (*Result, error) {
	defer s.Close()
	for {
		if _, err := s.Recv(); errors.Is(err, io.EOF) {
			return s.assembler.Result(), nil
		} else if err != nil {
			return nil, err
		}
	}
}

// Close cancels the call and any resume still to come; the server stops
// generation (unless the response is resumable: CancelResponse stops it).
// Safe to call more than once and from another goroutine.
func (s *Stream) Close() {
	s.cancel()
}

// Result is the verified result once the Completion was read, else nil.
func (s *Stream) Result() *Result { return s.assembler.Result() }

// LastSequence is the last sequence received in order.
func (s *Stream) LastSequence() uint32 { return s.assembler.LastSequence() }

// Text is the text received so far (the final text once completed).
func (s *Stream) Text() string { return s.assembler.Text() }

// ToolCalls are the tool calls received so far, arguments as far as they
// came; once completed, the final calls from Completed (each Complete).
func (s *Stream) ToolCalls() []ToolCall { return s.assembler.ToolCalls() }

// ResponseID is the response's id once the first chunk or heartbeat came.
func (s *Stream) ResponseID() string { return s.assembler.ResponseID() }

// RequestID is the x-request-id the server echoed (once the first event came).
func (s *Stream) RequestID() string { return s.assembler.RequestID }

// Resumes is how many times the stream reconnected.
func (s *Stream) Resumes() int { return s.resumes }
