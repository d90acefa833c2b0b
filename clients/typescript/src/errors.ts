/**
 * Typed errors for tokenwire callers, mapped from the gRPC status and the
 * `google.rpc` details of the `grpc-status-details-bin` trailer.
 *
 * Callers branch on the class (the gRPC code) and on `reason` (the stable
 * `ErrorInfo.reason`); `lastSequence` tells a streaming caller what it holds.
 * Same hierarchy as the Python client's `tokenwire.errors`.
 */

import { Code, ConnectError } from "@connectrpc/connect";
import type { Duration } from "@bufbuild/protobuf/wkt";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

export const STATUS_DETAILS_KEY = "grpc-status-details-bin";
export const LAST_SEQUENCE_KEY = "tokenwire-last-sequence";

/** gRPC status codes by name (same numbers as on the wire). */
export const StatusCode = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;
export type StatusCode = (typeof StatusCode)[keyof typeof StatusCode];

/** The status name of a numeric code, for messages: 3 → "INVALID_ARGUMENT". */
export function statusName(code: number): string {
  for (const [name, value] of Object.entries(StatusCode)) {
    if (value === code) return name;
  }
  return "UNKNOWN";
}

/** One offending request field, from `google.rpc.BadRequest`. */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/** One exceeded limit, from `google.rpc.QuotaFailure`. */
export interface QuotaViolation {
  readonly subject: string;
  readonly description: string;
}

export interface TokenwireErrorInit {
  code?: number;
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  fieldViolations?: readonly FieldViolation[];
  quotaViolations?: readonly QuotaViolation[];
  /** Seconds, from `google.rpc.RetryInfo`. */
  retryDelay?: number | undefined;
  lastSequence?: number | undefined;
  trailers?: Record<string, string>;
  /** True when the status came from the server (a `grpc-status` trailer), not the transport. */
  fromServer?: boolean;
  cause?: unknown;
}

/** Base class: `code` is the gRPC status code, `reason` the `ErrorInfo` reason. */
export class TokenwireError extends Error {
  readonly code: number;
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly fieldViolations: readonly FieldViolation[];
  readonly quotaViolations: readonly QuotaViolation[];
  readonly retryDelay: number | undefined;
  readonly lastSequence: number | undefined;
  readonly trailers: Readonly<Record<string, string>>;
  readonly fromServer: boolean;
  /** The message without the code and reason prefix. */
  readonly rawMessage: string;

  constructor(message: string, init: TokenwireErrorInit = {}) {
    const code = init.code ?? StatusCode.UNKNOWN;
    const reason = init.reason ?? "";
    super(`${statusName(code)}${reason ? ` ${reason}` : ""}: ${message}`, { cause: init.cause });
    this.name = new.target.name;
    this.rawMessage = message;
    this.code = code;
    this.reason = reason;
    this.domain = init.domain ?? "";
    this.metadata = init.metadata ?? {};
    this.fieldViolations = init.fieldViolations ?? [];
    this.quotaViolations = init.quotaViolations ?? [];
    this.retryDelay = init.retryDelay;
    this.lastSequence = init.lastSequence;
    this.trailers = init.trailers ?? {};
    this.fromServer = init.fromServer ?? false;
  }
}

export class Cancelled extends TokenwireError {}
export class Unknown extends TokenwireError {}
export class InvalidArgument extends TokenwireError {}
export class DeadlineExceeded extends TokenwireError {}
export class NotFound extends TokenwireError {}
export class AlreadyExists extends TokenwireError {}
export class PermissionDenied extends TokenwireError {}
export class ResourceExhausted extends TokenwireError {}
export class FailedPrecondition extends TokenwireError {}
export class Aborted extends TokenwireError {}
export class OutOfRange extends TokenwireError {}
export class Unimplemented extends TokenwireError {}
export class Internal extends TokenwireError {}
export class Unavailable extends TokenwireError {}
export class DataLoss extends TokenwireError {}
export class Unauthenticated extends TokenwireError {}

/** The stream broke the tokenwire contract (gap, bad offset, event after Completed). */
export class ProtocolError extends TokenwireError {}

/** What was received does not hash to what the server says it sent. */
export class IntegrityError extends ProtocolError {}

const BY_CODE: Record<number, new (message: string, init?: TokenwireErrorInit) => TokenwireError> = {
  [StatusCode.CANCELLED]: Cancelled,
  [StatusCode.UNKNOWN]: Unknown,
  [StatusCode.INVALID_ARGUMENT]: InvalidArgument,
  [StatusCode.DEADLINE_EXCEEDED]: DeadlineExceeded,
  [StatusCode.NOT_FOUND]: NotFound,
  [StatusCode.ALREADY_EXISTS]: AlreadyExists,
  [StatusCode.PERMISSION_DENIED]: PermissionDenied,
  [StatusCode.RESOURCE_EXHAUSTED]: ResourceExhausted,
  [StatusCode.FAILED_PRECONDITION]: FailedPrecondition,
  [StatusCode.ABORTED]: Aborted,
  [StatusCode.OUT_OF_RANGE]: OutOfRange,
  [StatusCode.UNIMPLEMENTED]: Unimplemented,
  [StatusCode.INTERNAL]: Internal,
  [StatusCode.UNAVAILABLE]: Unavailable,
  [StatusCode.DATA_LOSS]: DataLoss,
  [StatusCode.UNAUTHENTICATED]: Unauthenticated,
};

function seconds(duration: Duration | undefined): number | undefined {
  if (duration === undefined) return undefined;
  return Number(duration.seconds) + duration.nanos / 1e9;
}

/**
 * Builds the typed error from any failure of a call. A `ConnectError` (what the
 * gRPC transport throws) has its status details decoded: exactly one
 * `ErrorInfo`, plus `BadRequest`, `RetryInfo` or `QuotaFailure`. Anything else
 * (already typed, or a plain exception) is returned typed as it is or as UNKNOWN.
 */
export function fromError(error: unknown): TokenwireError {
  if (error instanceof TokenwireError) return error;
  if (!(error instanceof ConnectError)) {
    const message = error instanceof Error ? error.message : String(error);
    return new Unknown(message, { cause: error });
  }
  const fromServer = error.metadata.has("grpc-status") || error.details.length > 0;
  // Numbers are the gRPC codes. Connect reports a reset connection (ECONNRESET,
  // a destroyed HTTP/2 stream) as ABORTED; gRPC and the Python client call a
  // dropped connection UNAVAILABLE, so a transport-side ABORTED becomes that.
  const code: number =
    !fromServer && error.code === Code.Aborted ? StatusCode.UNAVAILABLE : error.code;
  const trailers: Record<string, string> = {};
  error.metadata.forEach((value, key) => {
    if (key !== STATUS_DETAILS_KEY && !key.endsWith("-bin")) trailers[key] = value;
  });
  let reason = "";
  let domain = "";
  let metadata: Record<string, string> = {};
  const fieldViolations: FieldViolation[] = [];
  const quotaViolations: QuotaViolation[] = [];
  let retryDelay: number | undefined;
  for (const info of error.findDetails(ErrorInfoSchema)) {
    reason = info.reason;
    domain = info.domain;
    metadata = { ...info.metadata };
  }
  for (const bad of error.findDetails(BadRequestSchema)) {
    for (const v of bad.fieldViolations) {
      fieldViolations.push({ field: v.field, description: v.description });
    }
  }
  for (const retry of error.findDetails(RetryInfoSchema)) {
    retryDelay = seconds(retry.retryDelay);
  }
  for (const quota of error.findDetails(QuotaFailureSchema)) {
    for (const v of quota.violations) {
      quotaViolations.push({ subject: v.subject, description: v.description });
    }
  }
  const last = trailers[LAST_SEQUENCE_KEY] ?? metadata["lastSequence"];
  const Class = BY_CODE[code] ?? TokenwireError;
  return new Class(error.rawMessage, {
    code,
    reason,
    domain,
    metadata,
    fieldViolations,
    quotaViolations,
    retryDelay,
    lastSequence: last !== undefined && /^\d+$/.test(last) ? Number(last) : undefined,
    trailers,
    fromServer,
    cause: error,
  });
}
