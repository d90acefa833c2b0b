/**
 * Client-side enforcement of the stream contract (the Python client's
 * `tokenwire.stream`): contiguous sequences, exact UTF-8 byte offsets, and a
 * SHA-256 of what was received checked against `Completed.final_sha256`. A
 * divergence reported by the server becomes an explicit `retraction` event
 * before the `completion`.
 */

import { createHash, type Hash } from "node:crypto";

import { create } from "@bufbuild/protobuf";
import type { Duration } from "@bufbuild/protobuf/wkt";

import { IntegrityError, ProtocolError } from "./errors.js";
import type { ObservationKind } from "./observed.js";
import {
  type Completed,
  type RespondResponse,
  ResumeFromSchema,
  type StreamRespondRequest,
  StreamRespondRequestSchema,
  type StreamRespondResponse,
  type TokenChunk,
  VerificationStatus,
} from "./gen/tokenwire/v1/respond_pb.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** UTF-8 bytes of a string. */
export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

/** Lower-case hex SHA-256 of the UTF-8 encoding of `text`. */
export function sha256Hex(text: string): string {
  return createHash("sha256").update(utf8(text)).digest("hex");
}

/** A piece of governed text, in order. */
export interface ChunkEvent {
  readonly type: "chunk";
  readonly sequence: number;
  readonly text: string;
  /** UTF-8 bytes of all earlier chunks. */
  readonly textOffset: number;
  readonly tokenCount: number;
  readonly message: TokenChunk;
}

/** The server is alive; generation is silent. */
export interface HeartbeatEvent {
  readonly type: "heartbeat";
  readonly responseId: string;
}

/**
 * The server's final payload differs from what was streamed: drop every chunk
 * from `fromSequence` on (their text starts at byte `fromOffset`); `finalText`
 * replaces the whole answer.
 */
export interface RetractionEvent {
  readonly type: "retraction";
  readonly fromSequence: number;
  readonly fromOffset: number;
  readonly keptText: string;
  readonly finalText: string;
}

/** The last event of a stream. */
export interface CompletionEvent {
  readonly type: "completion";
  readonly result: Result;
}

export type StreamEvent = ChunkEvent | HeartbeatEvent | RetractionEvent | CompletionEvent;

function durationSeconds(duration: Duration | undefined): number {
  return duration === undefined ? 0 : Number(duration.seconds) + duration.nanos / 1e9;
}

/** The verified outcome of a call. */
export class Result {
  constructor(
    readonly text: string,
    readonly sha256: string,
    readonly completed: Completed,
    readonly chunkCount: number,
    readonly retraction: RetractionEvent | undefined = undefined,
    readonly requestId: string = "",
    /** Non-zero when resumed by hand after this sequence: `text` holds only what came after. */
    readonly resumedAfter: number = 0,
  ) {}

  /** True when the text held equals the server's final payload by SHA-256. */
  get verified(): boolean {
    return sha256Hex(this.text) === this.sha256;
  }

  /** Seconds from the request's arrival to the first chunk. */
  get timeToFirstToken(): number {
    return durationSeconds(this.completed.timing?.timeToFirstToken);
  }

  /** Seconds from the request's arrival to `Completed`. */
  get totalTime(): number {
    return durationSeconds(this.completed.timing?.total);
  }
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function startsWith(whole: Uint8Array, prefix: Uint8Array): boolean {
  if (prefix.length > whole.length) return false;
  for (let i = 0; i < prefix.length; i++) if (whole[i] !== prefix[i]) return false;
  return true;
}

/** Checks and reassembles one response's events. */
export class StreamAssembler {
  requestId: string;
  /** Resuming by hand: the caller holds chunks 1..n already (but not here). */
  readonly resumedAfter: number;
  result: Result | undefined = undefined;
  /**
   * Told of each ordering violation before it is thrown as a `ProtocolError`
   * (kinds `sequence_gap`, `sequence_repeat`, `offset_mismatch`,
   * `event_after_completed`). A client's streams set it to count them.
   */
  observe: ((kind: ObservationKind, detail: string) => void) | undefined;
  private readonly parts: Uint8Array[] = [];
  private nextSequence: number;
  private nextOffset: number;
  private readonly digest: Hash = createHash("sha256");
  private responseIdValue = "";

  constructor(
    options: {
      requestId?: string;
      resumedAfter?: number;
      responseId?: string;
      observe?: (kind: ObservationKind, detail: string) => void;
    } = {},
  ) {
    this.requestId = options.requestId ?? "";
    this.observe = options.observe;
    this.resumedAfter = options.resumedAfter ?? 0;
    this.responseIdValue = options.responseId ?? "";
    this.nextSequence = this.resumedAfter + 1;
    this.nextOffset = this.resumedAfter ? -1 : 0; // learnt from the first chunk when resuming
  }

  get lastSequence(): number {
    return this.nextSequence - 1;
  }

  get responseId(): string {
    return this.responseIdValue;
  }

  /** The request that continues this stream after what it holds. */
  resumeRequest(): StreamRespondRequest {
    return create(StreamRespondRequestSchema, {
      resume: create(ResumeFromSchema, {
        responseId: this.responseIdValue,
        afterSequence: this.lastSequence,
      }),
    });
  }

  private violation(kind: ObservationKind, detail: string): ProtocolError {
    this.observe?.(kind, detail);
    return new ProtocolError(detail, { lastSequence: this.lastSequence });
  }

  /** Takes one wire event; returns the events a caller should see. */
  feed(message: StreamRespondResponse): StreamEvent[] {
    if (this.result !== undefined) {
      throw this.violation("event_after_completed", "event after Completed");
    }
    const event = message.event;
    switch (event.case) {
      case "chunk":
        return [this.chunk(event.value)];
      case "heartbeat":
        this.responseIdValue ||= event.value.responseId;
        return [{ type: "heartbeat", responseId: event.value.responseId }];
      case "completed":
        return this.completed(event.value);
      default:
        throw new ProtocolError("unknown or empty event", { lastSequence: this.lastSequence });
    }
  }

  private chunk(chunk: TokenChunk): ChunkEvent {
    if (this.responseIdValue && chunk.responseId !== this.responseIdValue) {
      throw new ProtocolError(
        `chunk of response ${chunk.responseId} inside ${this.responseIdValue}`,
        { lastSequence: this.lastSequence },
      );
    }
    if (this.nextOffset === -1) this.nextOffset = chunk.textOffset;
    if (chunk.sequence !== this.nextSequence || chunk.textOffset !== this.nextOffset) {
      const kind: ObservationKind =
        chunk.sequence > this.nextSequence
          ? "sequence_gap"
          : chunk.sequence < this.nextSequence
            ? "sequence_repeat"
            : "offset_mismatch";
      throw this.violation(
        kind,
        `expected chunk ${this.nextSequence} at byte ${this.nextOffset}, got ` +
          `${chunk.sequence} at byte ${chunk.textOffset}`,
      );
    }
    this.responseIdValue = chunk.responseId;
    const data = utf8(chunk.text);
    this.parts.push(data);
    this.digest.update(data);
    this.nextSequence += 1;
    this.nextOffset += data.length;
    return {
      type: "chunk",
      sequence: chunk.sequence,
      text: chunk.text,
      textOffset: chunk.textOffset,
      tokenCount: chunk.tokenCount,
      message: chunk,
    };
  }

  private completed(completed: Completed): StreamEvent[] {
    const last = this.lastSequence;
    if (completed.lastSequence > last) {
      throw this.violation(
        "sequence_gap",
        `Completed names last sequence ${completed.lastSequence}, received ${last}`,
      );
    }
    if (completed.lastSequence !== last) {
      throw new ProtocolError(
        `Completed names last sequence ${completed.lastSequence}, received ${last}`,
        { lastSequence: last },
      );
    }
    if (this.responseIdValue && completed.responseId !== this.responseIdValue) {
      throw new ProtocolError(
        `Completed of response ${completed.responseId} ends ${this.responseIdValue}`,
        { lastSequence: last },
      );
    }
    if (completed.chunkCount !== last) {
      throw new ProtocolError(`Completed counts ${completed.chunkCount} chunks, received ${last}`, {
        lastSequence: last,
      });
    }
    this.responseIdValue ||= completed.responseId;
    const status = completed.verification?.status ?? VerificationStatus.UNSPECIFIED;
    const requestId = this.requestId || completed.requestId;
    if (
      status !== VerificationStatus.VERIFIED &&
      status !== VerificationStatus.DIVERGED
    ) {
      throw new ProtocolError(`Completed without a verification result (${status})`, {
        lastSequence: last,
      });
    }
    const received = concat(this.parts);
    if (this.resumedAfter) {
      // Only part of the text is here: the server verified the whole.
      this.result = new Result(
        decoder.decode(received),
        completed.finalSha256,
        completed,
        last,
        undefined,
        requestId,
        this.resumedAfter,
      );
      return [{ type: "completion", result: this.result }];
    }
    const events: StreamEvent[] = [];
    let text: string;
    let retraction: RetractionEvent | undefined;
    if (status === VerificationStatus.VERIFIED) {
      const streamed = this.digest.digest("hex");
      if (streamed !== completed.finalSha256) {
        throw new IntegrityError(
          `received text hashes to ${streamed}, server says ${completed.finalSha256}`,
          { lastSequence: last },
        );
      }
      text = decoder.decode(received);
      if (completed.finalText && completed.finalText !== text) {
        throw new IntegrityError("final_text differs from the verified stream", {
          lastSequence: last,
        });
      }
    } else {
      text = completed.finalText;
      if (sha256Hex(text) !== completed.finalSha256) {
        throw new IntegrityError("final_text does not hash to final_sha256", { lastSequence: last });
      }
      const fromSequence = completed.verification?.retractFromSequence ?? 0;
      if (fromSequence < 1 || fromSequence > this.nextSequence) {
        throw new ProtocolError(`retraction from unknown sequence ${fromSequence}`, {
          lastSequence: last,
        });
      }
      const kept = concat(this.parts.slice(0, fromSequence - 1));
      if (!startsWith(utf8(text), kept)) {
        throw new IntegrityError(
          `chunks before ${fromSequence} are not a prefix of the final text`,
          { lastSequence: last },
        );
      }
      retraction = {
        type: "retraction",
        fromSequence,
        fromOffset: kept.length,
        keptText: decoder.decode(kept),
        finalText: text,
      };
      events.push(retraction);
    }
    this.result = new Result(text, completed.finalSha256, completed, last, retraction, requestId);
    events.push({ type: "completion", result: this.result });
    return events;
  }
}

/** Checks a unary payload against its digest and verification. */
export function unaryResult(response: RespondResponse, requestId = ""): Result {
  const completed = response.completed;
  if (completed === undefined) throw new ProtocolError("RespondResponse without completed");
  const text = completed.finalText;
  const digest = sha256Hex(text);
  if (completed.verification?.status !== VerificationStatus.VERIFIED) {
    throw new ProtocolError("unary payload is not verified");
  }
  if (digest !== completed.finalSha256) {
    throw new IntegrityError(`payload hashes to ${digest}, server says ${completed.finalSha256}`);
  }
  return new Result(text, completed.finalSha256, completed, 0, undefined, requestId || completed.requestId);
}
