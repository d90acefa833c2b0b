/**
 * What a client saw servers (or the proxies between) do wrong, counted per
 * client — the Python client's `tokenwire.observed`, in camelCase.
 *
 * Every `TokenwireClient` counts, from the moment it is made, the ordering
 * violations its streams met (a sequence gap or repeat, an offset that does not
 * follow the text received, any event after `Completed`) and the stalls (a
 * running stream waiting longer than `stallTimeoutMs` for its next event, not
 * even a heartbeat). Read them on `client.observed`, or pass `onObservation` to
 * hear of each as it happens and export them to your own metrics; nothing here
 * needs a metrics library.
 *
 * A violation also throws `ProtocolError` in the stream that met it (the
 * counter says it happened; the error stops the caller from trusting the text).
 * A stall does not end the stream: the call's deadline still does.
 */

/** How long a stream may wait for its next event before a stall is counted. */
export const DEFAULT_STALL_TIMEOUT_MS = 30_000;

/** One thing counted; each kind adds one to one counter of `Observed`. */
export type ObservationKind =
  | "sequence_gap"
  | "sequence_repeat"
  | "offset_mismatch"
  | "event_after_completed"
  | "stall";

/** What `onObservation` hears. */
export interface Observation {
  readonly kind: ObservationKind;
  readonly responseId: string;
  /** The last sequence the stream held when it happened. */
  readonly lastSequence: number;
  readonly detail: string;
}

/** Counts since the client was made; each only grows. */
export class Observed {
  /** A chunk whose sequence skipped ahead (or a `Completed` naming chunks never received). */
  sequenceGaps = 0;
  /** A chunk whose sequence was one already received (or earlier). */
  sequenceRepeats = 0;
  /** A chunk in sequence whose byte offset is not where the text so far ends. */
  offsetMismatches = 0;
  /** Anything the server sent after `Completed`. */
  eventsAfterCompleted = 0;
  /** A running stream that waited longer than `stallTimeoutMs` for its next event (once per silence). */
  stalls = 0;

  /** Gaps, repeats, offset mismatches and events after `Completed` together. */
  get orderingViolations(): number {
    return (
      this.sequenceGaps + this.sequenceRepeats + this.offsetMismatches + this.eventsAfterCompleted
    );
  }

  /** A plain copy (with `orderingViolations`), e.g. for a log line. */
  toJSON(): Record<string, number> {
    return {
      sequenceGaps: this.sequenceGaps,
      sequenceRepeats: this.sequenceRepeats,
      offsetMismatches: this.offsetMismatches,
      eventsAfterCompleted: this.eventsAfterCompleted,
      orderingViolations: this.orderingViolations,
      stalls: this.stalls,
    };
  }
}

const COUNTERS = {
  sequence_gap: "sequenceGaps",
  sequence_repeat: "sequenceRepeats",
  offset_mismatch: "offsetMismatches",
  event_after_completed: "eventsAfterCompleted",
  stall: "stalls",
} as const satisfies Record<ObservationKind, keyof Observed>;

export type ObservationHook = (observation: Observation) => void;

/** A client's counters and hook, shared by its streams. */
export class Observer {
  readonly counts = new Observed();

  constructor(private readonly hook?: ObservationHook) {}

  record(observation: Observation): void {
    this.counts[COUNTERS[observation.kind]] += 1;
    if (this.hook === undefined) return;
    try {
      this.hook(observation);
    } catch (error) {
      // A broken exporter must not break a stream.
      process.emitWarning(`tokenwire: the onObservation hook failed on ${observation.kind}: ${String(error)}`);
    }
  }
}

/**
 * Counts a stall when a stream waits for the server longer than the timeout. A
 * silence starts when the stream begins waiting after an event (time the caller
 * spends between reads is not the server's silence) and lasts, across resumes
 * and their backoff, until the next event; each silence counts at most once.
 */
export class StallWatch {
  private timer: NodeJS.Timeout | undefined;
  private since: number | undefined;
  private counted = false;

  constructor(
    private readonly timeoutMs: number,
    private readonly record: (observation: Observation) => void,
  ) {}

  /** The stream starts waiting for the server, holding this response and sequence. */
  waiting(responseId: string, lastSequence: number): void {
    const now = Date.now();
    this.since ??= now;
    if (this.counted) return;
    const since = this.since;
    const left = Math.max(0, this.timeoutMs - (now - since));
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.counted = true;
      const silent = ((Date.now() - since) / 1000).toFixed(1);
      this.record({
        kind: "stall",
        responseId,
        lastSequence,
        detail: `no event for ${silent} s (stall timeout ${this.timeoutMs / 1000} s)`,
      });
    }, left);
    this.timer.unref(); // a watch never keeps the process alive
  }

  /** The wait ended: with an event (the next wait starts a new silence) or without one. */
  stopped(event: boolean): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (event) {
      this.since = undefined;
      this.counted = false;
    }
  }
}
