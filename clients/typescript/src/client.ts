/**
 * The tokenwire client for Node: one HTTP/2 gRPC connection (Connect-ES's
 * `createGrpcTransport`, plain gRPC, no Connect protocol, no gRPC-Web).
 *
 * Like the Python client it puts a deadline on every call (60 s by default: a
 * call without one can hang forever behind a stuck proxy), checks every chunk
 * (`stream.ts`), resumes a resumable stream whose connection drops, and
 * throws the typed errors of `errors.ts`.
 */

import { readFileSync } from "node:fs";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  DeadlineExceeded,
  ProtocolError,
  StatusCode,
  type TokenwireError,
  fromError,
} from "./errors.js";
import {
  type ChatMessage,
  ChatMessageSchema,
  CancelRequestSchema,
  DeliveryMode,
  type GenerationParams,
  GenerationParamsSchema,
  RespondRequestSchema,
  RespondService,
  Role,
  type StreamRespondRequest,
  StreamRespondRequestSchema,
} from "./gen/tokenwire/v1/respond_pb.js";
import {
  DEFAULT_STALL_TIMEOUT_MS,
  type ObservationHook,
  type ObservationKind,
  type Observed,
  Observer,
  StallWatch,
} from "./observed.js";
import { type Result, StreamAssembler, type StreamEvent, type ToolCall, unaryResult } from "./stream.js";
import {
  type ResponseFormatSpec,
  type ToolChoiceSpec,
  type ToolSpec,
  responseFormat,
  toolChoice,
  tools,
} from "./tools.js";

export const DEFAULT_TARGET = "localhost:50051";
export const DEFAULT_TIMEOUT_MS = 60_000;
export const REQUEST_ID_HEADER = "x-request-id";

/** PEM material for TLS: `ca` to trust the server (system roots when omitted), `cert` and `key` for mTLS. */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Overrides the name checked against the server certificate (SNI too). */
  serverName?: string;
}

/** TLS options from PEM files (any may be omitted). */
export function tlsFromFiles(ca?: string, cert?: string, key?: string): TlsOptions {
  if (Boolean(cert) !== Boolean(key)) {
    throw new Error("a client certificate needs both cert and key");
  }
  const read = (path?: string): Buffer | undefined => (path ? readFileSync(path) : undefined);
  const options: TlsOptions = {};
  const caPem = read(ca);
  const certPem = read(cert);
  const keyPem = read(key);
  if (caPem) options.ca = caPem;
  if (certPem) options.cert = certPem;
  if (keyPem) options.key = keyPem;
  return options;
}

/** How a stream survives a dropped connection: bounded, jittered, within the deadline. */
export class ResumePolicy {
  constructor(
    readonly attempts = 3,
    /** Seconds before the first retry; doubled per retry, times a jitter of 0.5–1.5. */
    readonly backoff = 0.1,
  ) {}

  /** Seconds to wait before retry `attempt` (0-based). */
  delay(attempt: number): number {
    return this.backoff * 2 ** attempt * (0.5 + Math.random());
  }
}

export interface ClientOptions {
  /** Default deadline of every call, in milliseconds (60 s). */
  timeoutMs?: number;
  /** `true` for TLS with the system roots, or PEM material; plaintext (h2c) when omitted. */
  tls?: boolean | TlsOptions;
  /** Sent as `authorization: Bearer <key>`. */
  apiKey?: string;
  /** Extra request headers on every call. */
  headers?: Record<string, string>;
  /** Resume policy for resumable streams; `null` never resumes. */
  resume?: ResumePolicy | null;
  /**
   * How long a stream may wait for its next event (chunk, heartbeat,
   * `Completed`) before `observed.stalls` counts a stall (30 s; 0 counts none).
   */
  stallTimeoutMs?: number;
  /** Hears each ordering violation and stall after it is counted (`observed.ts`). */
  onObservation?: ObservationHook;
}

export type Mode = "auto" | "stream" | "buffered";
const MODES: Record<Mode, DeliveryMode> = {
  auto: DeliveryMode.AUTO,
  stream: DeliveryMode.STREAM,
  buffered: DeliveryMode.BUFFERED,
};

/** A user prompt, or the whole conversation. */
export type Prompt = string | readonly MessageInitShape<typeof ChatMessageSchema>[];

export interface RespondOptions {
  model?: string;
  system?: string;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  stop?: readonly string[];
  seed?: number | bigint;
  labels?: Record<string, string>;
  requestId?: string;
  /** Tools the model may call: OpenAI-style `{type: "function", function: {...}}` or bare `{name, ...}`. */
  tools?: readonly ToolSpec[];
  /** `auto`, `none`, `required`, or the name of the one tool the model must call. */
  toolChoice?: ToolChoiceSpec;
  /** The shape of the text: `json_object`, `{type: "json_schema", json_schema: {...}}`, ... */
  responseFormat?: ResponseFormatSpec;
  /** This call's deadline in milliseconds (the client's default otherwise). */
  timeoutMs?: number;
  /** Aborting it cancels the call. */
  signal?: AbortSignal;
}

export interface StreamOptions extends RespondOptions {
  mode?: Mode;
  maxTokensPerChunk?: number;
  /** How long the server may hold released tokens to fill a chunk, in milliseconds. */
  maxDelayMs?: number;
  omitFinalText?: boolean;
  /** Keep generating if the connection drops; the client then resumes by sequence. */
  resumable?: boolean;
}

function messages(prompt: Prompt, system?: string): ChatMessage[] {
  const out: ChatMessage[] = [];
  if (system) out.push(create(ChatMessageSchema, { role: Role.SYSTEM, content: system }));
  if (typeof prompt === "string") {
    out.push(create(ChatMessageSchema, { role: Role.USER, content: prompt }));
  } else {
    for (const message of prompt) out.push(create(ChatMessageSchema, message));
  }
  return out;
}

function params(options: RespondOptions): GenerationParams {
  const p = create(GenerationParamsSchema, {
    maxTokens: options.maxTokens ?? 0,
    stop: [...(options.stop ?? [])],
  });
  if (options.temperature !== undefined) p.temperature = options.temperature;
  if (options.topP !== undefined) p.topP = options.topP;
  if (options.seed !== undefined) p.seed = BigInt(options.seed);
  return p;
}

function toolFields(options: RespondOptions) {
  return {
    tools: tools(options.tools ?? []),
    ...(options.toolChoice !== undefined ? { toolChoice: toolChoice(options.toolChoice) } : {}),
    ...(options.responseFormat !== undefined
      ? { responseFormat: responseFormat(options.responseFormat) }
      : {}),
  };
}

/** The `StreamRespondRequest` for a prompt and options. */
export function buildStreamRequest(prompt: Prompt, options: StreamOptions = {}): StreamRespondRequest {
  const request = create(StreamRespondRequestSchema, {
    requestId: options.requestId ?? "",
    model: options.model ?? "",
    messages: messages(prompt, options.system),
    params: params(options),
    labels: { ...(options.labels ?? {}) },
    deliveryMode: MODES[options.mode ?? "auto"],
    chunking: { maxTokensPerChunk: options.maxTokensPerChunk ?? 0 },
    omitFinalText: options.omitFinalText ?? false,
    resumable: options.resumable ?? false,
    ...toolFields(options),
  });
  if (options.maxDelayMs !== undefined && request.chunking) {
    const nanos = BigInt(Math.round(options.maxDelayMs * 1e6));
    request.chunking.maxDelay = {
      $typeName: "google.protobuf.Duration",
      seconds: nanos / 1_000_000_000n,
      nanos: Number(nanos % 1_000_000_000n),
    };
  }
  return request;
}

/** The `RespondRequest` for a prompt and options. */
export function buildRespondRequest(prompt: Prompt, options: RespondOptions = {}) {
  return create(RespondRequestSchema, {
    requestId: options.requestId ?? "",
    model: options.model ?? "",
    messages: messages(prompt, options.system),
    params: params(options),
    labels: { ...(options.labels ?? {}) },
    ...toolFields(options),
  });
}

/**
 * A dropped connection (no tokenwire `ErrorInfo`), not a response that failed:
 * UNAVAILABLE without an ErrorInfo domain, as in the Python client, or
 * UNAVAILABLE `SERVER_STOPPING` (the replica stopped while the response,
 * shared through Redis, went on). A stream the transport ended without any
 * gRPC status (INTERNAL "missing status", e.g. a proxy closing the connection
 * cleanly mid-stream) counts too.
 */
export function worthResuming(error: TokenwireError): boolean {
  if (error instanceof ProtocolError) return false;
  if (error.domain) {
    return error.code === StatusCode.UNAVAILABLE && error.reason === "SERVER_STOPPING";
  }
  if (error.code === StatusCode.UNAVAILABLE) return true;
  return !error.fromServer && error.code === StatusCode.INTERNAL;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * An in-progress `StreamRespond`: iterate (once) for events; `result` once
 * completed. A resumable stream whose connection drops reconnects with the
 * last sequence it holds, so the caller sees one seamless, verified stream.
 */
export class ResponseStream implements AsyncIterable<StreamEvent> {
  /** Reconnections made so far. */
  resumes = 0;
  private readonly deadline: number;
  private readonly assembler: StreamAssembler;
  private readonly resume: ResumePolicy | null;
  private controller: AbortController | undefined;
  private cancelled = false;
  private started = false;
  private readonly stalls: StallWatch | undefined;

  constructor(
    private readonly rpc: Client<typeof RespondService>,
    private readonly request: StreamRespondRequest,
    timeoutMs: number,
    private readonly headers: Record<string, string>,
    resume: ResumePolicy | null,
    assembler?: StreamAssembler,
    private readonly signal?: AbortSignal,
    observer?: Observer,
    stallTimeoutMs = 0,
  ) {
    this.deadline = Date.now() + timeoutMs;
    this.resume = request.resumable ? resume : null;
    this.assembler = assembler ?? new StreamAssembler();
    if (observer !== undefined) {
      this.assembler.observe ??= (kind: ObservationKind, detail: string) =>
        observer.record({
          kind,
          responseId: this.assembler.responseId,
          lastSequence: this.assembler.lastSequence,
          detail,
        });
      if (stallTimeoutMs > 0) {
        this.stalls = new StallWatch(stallTimeoutMs, (o) => observer.record(o));
      }
    }
    if (signal?.aborted) this.cancelled = true;
    signal?.addEventListener("abort", () => this.cancel(), { once: true });
  }

  get result(): Result | undefined {
    return this.assembler.result;
  }

  get lastSequence(): number {
    return this.assembler.lastSequence;
  }

  get responseId(): string {
    return this.assembler.responseId;
  }

  /** The text received so far (the final text once completed). */
  get text(): string {
    return this.assembler.text;
  }

  /** The tool calls received so far; once completed, the final calls from `Completed`. */
  get toolCalls(): ToolCall[] {
    return this.assembler.toolCalls;
  }

  /**
   * Cancels the call and any resume still to come; the server stops generation
   * (unless the stream is resumable: then `cancelResponse` stops it).
   */
  cancel(): void {
    this.cancelled = true;
    this.controller?.abort();
  }

  /** Consumes the stream and returns the verified result. */
  async collect(): Promise<Result> {
    for await (const _ of this) {
      // events are checked and assembled as they pass
    }
    return this.assembler.result as Result;
  }

  [Symbol.asyncIterator](): AsyncIterator<StreamEvent> {
    if (this.started) throw new Error("a ResponseStream can be iterated once");
    this.started = true;
    return this.events();
  }

  private shouldResume(error: TokenwireError): boolean {
    return (
      !this.cancelled &&
      this.resume !== null &&
      this.resumes < this.resume.attempts &&
      Boolean(this.assembler.responseId) &&
      worthResuming(error) &&
      Date.now() < this.deadline
    );
  }

  private async *events(): AsyncGenerator<StreamEvent> {
    let request = this.request;
    for (;;) {
      const remaining = this.deadline - Date.now();
      if (remaining <= 0) {
        throw new DeadlineExceeded("the call's deadline passed before it could resume", {
          code: StatusCode.DEADLINE_EXCEEDED,
          lastSequence: this.lastSequence,
        });
      }
      const controller = new AbortController();
      this.controller = controller;
      if (this.cancelled) controller.abort();
      let messages: AsyncIterator<unknown> | undefined;
      let finished = false;
      try {
        const call = this.rpc.streamRespond(request, {
          timeoutMs: remaining,
          headers: this.headers,
          signal: controller.signal,
          onHeader: (header) => {
            this.assembler.requestId ||= header.get(REQUEST_ID_HEADER) ?? "";
          },
        });
        const iterator = call[Symbol.asyncIterator]();
        messages = iterator;
        for (;;) {
          this.stalls?.waiting(this.assembler.responseId, this.assembler.lastSequence);
          const next = await iterator.next();
          this.stalls?.stopped(!next.done);
          if (next.done) break;
          for (const event of this.assembler.feed(next.value)) yield event;
        }
        finished = true;
        break;
      } catch (caught) {
        const error = fromError(caught);
        if (error.lastSequence === undefined && !(error instanceof ProtocolError)) {
          // The transport knows nothing of sequences: say what the caller holds.
          Object.assign(error, { lastSequence: this.lastSequence });
        }
        if (!this.shouldResume(error)) throw error;
        this.resumes += 1;
        const delay = this.resume!.delay(this.resumes - 1) * 1000;
        await sleep(Math.max(0, Math.min(delay, this.deadline - Date.now())));
        if (this.cancelled) throw error;
        request = this.assembler.resumeRequest();
      } finally {
        this.stalls?.stopped(false);
        // A caller that stops reading (or a failed check) must stop generation too.
        controller.abort();
        if (!finished && messages !== undefined) {
          // Connect releases the call's deadline timer only when its iterator ends
          // or fails: one more read after the abort fails at once and does that.
          messages.next().catch(() => undefined);
        }
      }
    }
    if (this.assembler.result === undefined) {
      throw new ProtocolError("stream ended without Completed", { lastSequence: this.lastSequence });
    }
  }
}

/** Client over one HTTP/2 connection (reuse it: connections are expensive). */
export class TokenwireClient {
  readonly target: string;
  private readonly session: Http2SessionManager;
  private readonly rpc: Client<typeof RespondService>;
  private readonly timeoutMs: number;
  private readonly headers: Record<string, string>;
  private readonly resume: ResumePolicy | null;
  private readonly observer: Observer;
  private readonly stallTimeoutMs: number;

  constructor(target: string = DEFAULT_TARGET, options: ClientOptions = {}) {
    this.target = target;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.observer = new Observer(options.onObservation);
    this.stallTimeoutMs = options.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    if (!(this.stallTimeoutMs >= 0)) {
      throw new RangeError(`stallTimeoutMs must be 0 (off) or positive, got ${this.stallTimeoutMs}`);
    }
    this.resume = options.resume === undefined ? new ResumePolicy() : options.resume;
    this.headers = { ...(options.headers ?? {}) };
    if (options.apiKey) this.headers["authorization"] = `Bearer ${options.apiKey}`;
    const tls = options.tls;
    const baseUrl = `${tls ? "https" : "http"}://${target}`;
    const nodeOptions =
      typeof tls === "object"
        ? {
            ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
            ...(tls.cert !== undefined ? { cert: tls.cert } : {}),
            ...(tls.key !== undefined ? { key: tls.key } : {}),
            ...(tls.serverName !== undefined ? { servername: tls.serverName } : {}),
          }
        : {};
    this.session = new Http2SessionManager(baseUrl, {}, nodeOptions);
    const transport = createGrpcTransport({ baseUrl, sessionManager: this.session });
    this.rpc = createClient(RespondService, transport);
  }

  /**
   * Ordering violations and stalls this client's streams met so far (live
   * counters: `orderingViolations`, `stalls`, and each kind).
   */
  get observed(): Observed {
    return this.observer.counts;
  }

  /** Closes the connection (and any call still open on it). */
  close(): void {
    this.session.abort();
  }

  /** Starts a `StreamRespond` for a prompt; iterate the returned stream for events. */
  stream(prompt: Prompt, options: StreamOptions = {}): ResponseStream {
    return this.streamRequest(buildStreamRequest(prompt, options), options);
  }

  /** Starts a `StreamRespond` from a ready request. */
  streamRequest(
    request: StreamRespondRequest,
    options: { timeoutMs?: number; signal?: AbortSignal; assembler?: StreamAssembler } = {},
  ): ResponseStream {
    return new ResponseStream(
      this.rpc,
      request,
      options.timeoutMs ?? this.timeoutMs,
      this.headers,
      this.resume,
      options.assembler,
      options.signal,
      this.observer,
      this.stallTimeoutMs,
    );
  }

  /**
   * Continues a response by hand after the sequence the caller holds (for
   * example after a process restart): the result's `text` is what came after.
   */
  resumeStream(
    responseId: string,
    afterSequence: number,
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): ResponseStream {
    const assembler = new StreamAssembler({ resumedAfter: afterSequence, responseId });
    const request = create(StreamRespondRequestSchema, {
      resume: { responseId, afterSequence },
    });
    return this.streamRequest(request, { ...options, assembler });
  }

  /** Calls unary `Respond`: one verified payload. */
  async respond(prompt: Prompt, options: RespondOptions = {}): Promise<Result> {
    const request = buildRespondRequest(prompt, options);
    let requestId = "";
    try {
      const response = await this.rpc.respond(request, {
        timeoutMs: options.timeoutMs ?? this.timeoutMs,
        headers: this.headers,
        ...(options.signal ? { signal: options.signal } : {}),
        onHeader: (header) => {
          requestId = header.get(REQUEST_ID_HEADER) ?? "";
        },
      });
      return unaryResult(response, requestId);
    } catch (caught) {
      throw fromError(caught);
    }
  }

  /** Stops a response by id (`Cancel`); true when it was still running. */
  async cancelResponse(responseId: string, options: { timeoutMs?: number } = {}): Promise<boolean> {
    try {
      const answer = await this.rpc.cancel(create(CancelRequestSchema, { responseId }), {
        timeoutMs: options.timeoutMs ?? this.timeoutMs,
        headers: this.headers,
      });
      return answer.wasRunning;
    } catch (caught) {
      throw fromError(caught);
    }
  }
}
