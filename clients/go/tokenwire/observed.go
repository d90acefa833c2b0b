package tokenwire

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultStallTimeout is how long a stream may wait for its next event (a
// chunk, a heartbeat, Completed) before the client counts a stall. The
// server sends a heartbeat every 10 s of silence and fails a generation
// that produced no token for 30 s, so a healthy stream never gets near it.
const DefaultStallTimeout = 30 * time.Second

// ObservationKind names one thing a client counts (the names of the Python
// client's tokenwire.observed).
type ObservationKind string

const (
	// SequenceGap: a chunk whose sequence skipped ahead, or a Completed
	// naming chunks never received.
	SequenceGap ObservationKind = "sequence_gap"
	// SequenceRepeat: a chunk whose sequence was one already received (or earlier).
	SequenceRepeat ObservationKind = "sequence_repeat"
	// OffsetMismatch: a chunk in sequence whose text_offset is not where the
	// text so far ends (in UTF-8 bytes).
	OffsetMismatch ObservationKind = "offset_mismatch"
	// EventAfterCompleted: anything the server sent after Completed.
	EventAfterCompleted ObservationKind = "event_after_completed"
	// Stall: a running stream waited longer than the stall timeout for its
	// next event (counted once per silence).
	Stall ObservationKind = "stall"
)

// Observation is one thing counted, as the hook (WithObservationHook) hears it.
type Observation struct {
	Kind       ObservationKind
	ResponseID string
	// LastSequence is the last sequence the stream held when it happened.
	LastSequence uint32
	Detail       string
}

// Observed holds a client's counts since it was made; each only grows.
type Observed struct {
	SequenceGaps         uint64
	SequenceRepeats      uint64
	OffsetMismatches     uint64
	EventsAfterCompleted uint64
	Stalls               uint64
}

// OrderingViolations is gaps, repeats, offset mismatches and events after
// Completed together.
func (o Observed) OrderingViolations() uint64 {
	return o.SequenceGaps + o.SequenceRepeats + o.OffsetMismatches + o.EventsAfterCompleted
}

// observer is a client's counters and hook, shared by its streams.
type observer struct {
	gaps, repeats, offsets, afterCompleted, stalls atomic.Uint64
	hook                                           func(Observation)
}

func (o *observer) counter(kind ObservationKind) *atomic.Uint64 {
	switch kind {
	case SequenceGap:
		return &o.gaps
	case SequenceRepeat:
		return &o.repeats
	case OffsetMismatch:
		return &o.offsets
	case EventAfterCompleted:
		return &o.afterCompleted
	default:
		return &o.stalls
	}
}

func (o *observer) record(observation Observation) {
	o.counter(observation.Kind).Add(1)
	if o.hook != nil {
		o.hook(observation)
	}
}

func (o *observer) snapshot() Observed {
	return Observed{
		SequenceGaps:         o.gaps.Load(),
		SequenceRepeats:      o.repeats.Load(),
		OffsetMismatches:     o.offsets.Load(),
		EventsAfterCompleted: o.afterCompleted.Load(),
		Stalls:               o.stalls.Load(),
	}
}

// stallWatch counts a stall when a stream waits for its next event longer
// than the timeout. A silence starts when the stream begins waiting after an
// event (time the caller spends between reads is not the server's silence)
// and lasts, across resumes and their backoff, until the next event; each
// silence counts at most once.
type stallWatch struct {
	timeout time.Duration
	record  func(Observation)

	mu         sync.Mutex
	timer      *time.Timer
	generation uint64    // fire() of an earlier timer does nothing
	since      time.Time // start of the current silence; zero right after an event
	counted    bool      // this silence was counted
	// What the stream held when it began waiting (read on the timer's goroutine).
	responseID   string
	lastSequence uint32
}

// waiting is called, on the reader's goroutine, when the stream starts
// waiting for the server, with the response and last sequence it holds.
func (w *stallWatch) waiting(responseID string, lastSequence uint32) {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.responseID, w.lastSequence = responseID, lastSequence
	now := time.Now()
	if w.since.IsZero() {
		w.since = now
	}
	if w.counted {
		return
	}
	w.generation++
	generation := w.generation
	w.timer = time.AfterFunc(max(0, w.timeout-now.Sub(w.since)), func() { w.fire(generation) })
}

func (w *stallWatch) fire(generation uint64) {
	w.mu.Lock()
	if generation != w.generation || w.counted {
		w.mu.Unlock()
		return
	}
	w.counted = true
	observation := Observation{
		Kind: Stall, ResponseID: w.responseID, LastSequence: w.lastSequence,
		Detail: fmt.Sprintf("no event for %.1f s (stall timeout %s)", time.Since(w.since).Seconds(), w.timeout),
	}
	w.mu.Unlock()
	w.record(observation)
}

// stopped is called when the wait ends: with an event (a new silence starts
// with the next wait), or without one (an error; the silence goes on).
func (w *stallWatch) stopped(event bool) {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.generation++
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	if event {
		w.since, w.counted = time.Time{}, false
	}
}
