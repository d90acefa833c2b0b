/**
 * Client-side enforcement of the stream contract (the Python client's
 * `tokenwire.stream`): contiguous sequences, exact UTF-8 byte offsets, and a
 * SHA-256 of what was received checked against `Completed.final_sha256`. A
 * divergence reported by the server becomes an explicit `retraction` event
 * before the `completion`.
 *
 * Tool calls travel as fragments (`TokenChunk.toolCall`) in the same sequence
 * as the text: each is checked like a chunk (sequence, `textOffset`, which a
 * fragment does not advance) and placed by its `argumentsOffset`; the calls
 * assembled from them are checked against `Completed.toolCalls`.
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
  type ToolCall as ToolCallMessage,
  type VerificationCheck,
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

/**
 * A tool call: as assembled so far from its fragments, or as `Completed`
 * reports it (`complete`: the final, governed call). `arguments` is JSON text;
 * `id` and `name` come with a call's first fragment (a stream resumed by hand
 * after it knows them only from `Completed`).
 */
export interface ToolCall {
  readonly index: number;
  readonly id: string;
  readonly name: string;
  readonly arguments: string;
  readonly complete: boolean;
}

/** A call's arguments as a value (`JSON.parse`); `{}` when empty. */
export function parseArguments(call: ToolCall): unknown {
  return call.arguments ? JSON.parse(call.arguments) : {};
}

/**
 * One piece of a tool call, in order: a chunk that carries no text.
 * `arguments` is this piece, at byte `argumentsOffset` of the call's
 * arguments; `call` is the call as held after it. `id` and `name` are set on
 * a call's first fragment only (`first`).
 */
export interface ToolCallEvent {
  readonly type: "tool_call";
  readonly sequence: number;
  readonly index: number;
  readonly id: string;
  readonly name: string;
  readonly arguments: string;
  readonly argumentsOffset: number;
  readonly first: boolean;
  readonly call: ToolCall;
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
  /** The calls as held before `fromSequence` (fragments from it on are dropped too). */
  readonly keptToolCalls: readonly ToolCall[];
  /** `Completed.toolCalls`: the calls that replace every call streamed. */
  readonly finalToolCalls: readonly ToolCall[];
}

/** The last event of a stream. */
export interface CompletionEvent {
  readonly type: "completion";
  readonly result: Result;
}

export type StreamEvent =
  | ChunkEvent
  | ToolCallEvent
  | HeartbeatEvent
  | RetractionEvent
  | CompletionEvent;

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
    /** The final, governed tool calls (`Completed.toolCalls`), each complete. */
    readonly toolCalls: readonly ToolCall[] = finalToolCalls(completed),
  ) {}

  /** `Completed.verification.checks`: integrity, json_schema, tool_arguments, validators. */
  get checks(): readonly VerificationCheck[] {
    return this.completed.verification?.checks ?? [];
  }

  get checksPassed(): boolean {
    return this.completed.verification?.checksPassed ?? false;
  }

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

/** `Completed.toolCalls` as complete calls (index: position in the list). */
export function finalToolCalls(completed: Completed): ToolCall[] {
  return completed.toolCalls.map((call: ToolCallMessage, index: number) => ({
    index,
    id: call.id,
    name: call.name,
    arguments: call.arguments,
    complete: true,
  }));
}

/** A tool call's fragments as received. */
class HeldCall {
  id = "";
  name = "";
  readonly sequences: number[] = [];
  readonly parts: Uint8Array[] = [];
  size = 0;

  constructor(
    readonly index: number,
    /** Byte of the arguments where the first fragment held here starts. */
    readonly start: number,
  ) {}

  arguments(beforeSequence?: number): Uint8Array {
    return concat(
      this.parts.filter((_, i) => beforeSequence === undefined || this.sequences[i]! < beforeSequence),
    );
  }

  snapshot(beforeSequence?: number): ToolCall {
    return {
      index: this.index,
      id: this.id,
      name: this.name,
      arguments: decoder.decode(this.arguments(beforeSequence)),
      complete: false,
    };
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && startsWith(a, b);
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
  private readonly calls = new Map<number, HeldCall>();

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

  /** The text held so far (the final text once completed). */
  get text(): string {
    return this.result?.text ?? decoder.decode(concat(this.parts));
  }

  /**
   * The tool calls held so far, by index, arguments as far as they came; once
   * completed, the final calls from `Completed` (each `complete`).
   */
  get toolCalls(): ToolCall[] {
    if (this.result !== undefined) return [...this.result.toolCalls];
    return this.heldCalls().map((call) => call.snapshot());
  }

  private heldCalls(): HeldCall[] {
    return [...this.calls.values()].sort((a, b) => a.index - b.index);
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
        if (event.value.toolCall !== undefined) return [this.fragment(event.value)];
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

  /** Checks a chunk's response id, sequence and text offset (text or fragment). */
  private place(chunk: TokenChunk): void {
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
  }

  private chunk(chunk: TokenChunk): ChunkEvent {
    this.place(chunk);
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

  /**
   * A tool-call fragment: in sequence like a chunk, at the text offset (which
   * it does not advance), and at its call's `argumentsOffset`.
   */
  private fragment(chunk: TokenChunk): ToolCallEvent {
    this.place(chunk);
    const delta = chunk.toolCall!;
    const last = this.lastSequence;
    if (chunk.text) {
      throw new ProtocolError(
        `chunk ${chunk.sequence} carries both text and a tool-call fragment`,
        { lastSequence: last },
      );
    }
    let call = this.calls.get(delta.index);
    if (call === undefined) {
      // Calls are numbered in the order they begin; a stream resumed by hand may
      // begin inside any call (the earlier ones are the caller's).
      if (!this.resumedAfter && delta.index !== this.calls.size) {
        throw new ProtocolError(`tool call #${delta.index} begins before #${this.calls.size}`, {
          lastSequence: last,
        });
      }
      call = new HeldCall(delta.index, this.resumedAfter ? delta.argumentsOffset : 0);
    }
    const expected = call.start + call.size;
    if (delta.argumentsOffset !== expected) {
      throw this.violation(
        "offset_mismatch",
        `expected tool call #${delta.index} arguments at byte ${expected}, got chunk ` +
          `${chunk.sequence} at byte ${delta.argumentsOffset}`,
      );
    }
    for (const [what, held, got] of [
      ["id", call.id, delta.id],
      ["name", call.name, delta.name],
    ] as const) {
      if (held && got && held !== got) {
        throw new ProtocolError(
          `tool call #${delta.index} ${what} ${JSON.stringify(got)} in chunk ${chunk.sequence}, ` +
            `was ${JSON.stringify(held)}`,
          { lastSequence: last },
        );
      }
    }
    call.id ||= delta.id;
    call.name ||= delta.name;
    this.calls.set(delta.index, call);
    this.responseIdValue = chunk.responseId;
    const data = utf8(delta.arguments);
    call.sequences.push(chunk.sequence);
    call.parts.push(data);
    call.size += data.length;
    // A fragment holds no text: an empty part keeps `parts` indexed by sequence.
    this.parts.push(new Uint8Array(0));
    this.nextSequence += 1;
    return {
      type: "tool_call",
      sequence: chunk.sequence,
      index: delta.index,
      id: delta.id,
      name: delta.name,
      arguments: delta.arguments,
      argumentsOffset: delta.argumentsOffset,
      first: delta.argumentsOffset === 0 && Boolean(delta.id || delta.name),
      call: call.snapshot(),
      message: chunk,
    };
  }

  /**
   * Each call held (its fragments before `beforeSequence`, or all) must be the
   * final call of its index, or with a retraction a prefix of it.
   */
  private checkCalls(final: readonly ToolCall[], beforeSequence?: number): void {
    const last = this.lastSequence;
    const finals = new Map(final.map((call) => [call.index, call]));
    for (const held of this.heldCalls()) {
      if (beforeSequence !== undefined && held.sequences[0]! >= beforeSequence) continue;
      const target = finals.get(held.index);
      if (target === undefined) {
        throw new IntegrityError(
          `tool call #${held.index} was streamed but is not in Completed.tool_calls`,
          { lastSequence: last },
        );
      }
      if ((held.id && held.id !== target.id) || (held.name && held.name !== target.name)) {
        throw new IntegrityError(
          `tool call #${held.index} streamed as ${held.id} ${held.name}, ` +
            `Completed says ${target.id} ${target.name}`,
          { lastSequence: last },
        );
      }
      const args = held.arguments(beforeSequence);
      const whole = utf8(target.arguments);
      if (beforeSequence === undefined && !equalBytes(args, whole)) {
        throw new IntegrityError(
          `tool call #${held.index}: its fragments differ from its final arguments`,
          { lastSequence: last },
        );
      }
      if (beforeSequence !== undefined && !startsWith(whole, args)) {
        throw new IntegrityError(
          `tool call #${held.index}: fragments before ${beforeSequence} are not a prefix ` +
            "of its final arguments",
          { lastSequence: last },
        );
      }
    }
    if (beforeSequence === undefined) {
      const missing = final.filter((call) => !this.calls.has(call.index)).map((c) => c.index);
      if (missing.length) {
        throw new IntegrityError(
          `tool calls ${missing.join(", ")} are in Completed but were never streamed`,
          { lastSequence: last },
        );
      }
    }
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
    let finalCalls: readonly ToolCall[] = finalToolCalls(completed);
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
      if (finalCalls.length || !this.calls.size) {
        this.checkCalls(finalCalls);
      } else {
        // Completed without its calls (as final_text may be omitted): the
        // verified fragments are the calls.
        finalCalls = this.toolCalls.map((call) => ({ ...call, complete: true }));
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
      this.checkCalls(finalCalls, fromSequence);
      retraction = {
        type: "retraction",
        fromSequence,
        fromOffset: kept.length,
        keptText: decoder.decode(kept),
        finalText: text,
        keptToolCalls: this.heldCalls()
          .filter((call) => call.sequences[0]! < fromSequence)
          .map((call) => call.snapshot(fromSequence)),
        finalToolCalls: finalCalls,
      };
      events.push(retraction);
    }
    this.result = new Result(
      text,
      completed.finalSha256,
      completed,
      last,
      retraction,
      requestId,
      0,
      finalCalls,
    );
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
