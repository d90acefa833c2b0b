package tokenwire

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// LastSequenceTrailer is the trailing metadata key that carries the last
// delivered sequence of a failed stream (decimal).
const LastSequenceTrailer = "tokenwire-last-sequence"

// ErrorDomain is the ErrorInfo domain of every error tokenwire itself raises.
const ErrorDomain = "tokenwire.dev"

// FieldViolation is one entry of a google.rpc.BadRequest detail.
type FieldViolation struct {
	Field       string
	Description string
}

// QuotaViolation is one entry of a google.rpc.QuotaFailure detail.
type QuotaViolation struct {
	Subject     string
	Description string
}

// Error is a call that ended with a non-OK gRPC status, with the google.rpc
// details of its grpc-status-details-bin trailer decoded. Branch on Code
// (or errors.Is with ErrNotFound, ErrUnavailable, ...) and on Reason, the
// stable ErrorInfo reason such as "MODEL_NOT_FOUND":
//
//	var twErr *tokenwire.Error
//	if errors.As(err, &twErr) && twErr.Reason == "MAX_TOKENS_TOO_LARGE" { ... }
type Error struct {
	Code    codes.Code
	Message string
	// From ErrorInfo: the reason, its domain ("tokenwire.dev" for errors the
	// server raises; empty when no ErrorInfo came, e.g. a dropped connection)
	// and its metadata (lastSequence, knownModels, responseId, ...).
	Reason   string
	Domain   string
	Metadata map[string]string
	// From BadRequest: every offending field at once.
	FieldViolations []FieldViolation
	// From RetryInfo: how long to wait before retrying; HasRetryDelay says
	// whether the server sent one.
	RetryDelay    time.Duration
	HasRetryDelay bool
	// From QuotaFailure: which limits were hit.
	QuotaViolations []QuotaViolation
	// The last delivered sequence (trailer tokenwire-last-sequence, else
	// ErrorInfo metadata lastSequence); HasLastSequence says whether either
	// was present.
	LastSequence    uint32
	HasLastSequence bool
	// Every text trailer of the call (tokenwire-prompt-tokens, ...).
	Trailers metadata.MD

	status *status.Status
}

func (e *Error) Error() string {
	reason := ""
	if e.Reason != "" {
		reason = " " + e.Reason
	}
	return fmt.Sprintf("%s%s: %s", codeName(e.Code), reason, e.Message)
}

// GRPCStatus makes status.FromError and status.Code work on an *Error.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil {
		return e.status
	}
	return status.New(e.Code, e.Message)
}

// Is matches the code sentinels: errors.Is(err, tokenwire.ErrNotFound).
func (e *Error) Is(target error) bool {
	code, ok := target.(codeError)
	return ok && codes.Code(code) == e.Code
}

type codeError codes.Code

func (c codeError) Error() string { return codeName(codes.Code(c)) }

// Sentinels for errors.Is, one per gRPC status code a tokenwire call ends with.
var (
	ErrCancelled          error = codeError(codes.Canceled)
	ErrUnknown            error = codeError(codes.Unknown)
	ErrInvalidArgument    error = codeError(codes.InvalidArgument)
	ErrDeadlineExceeded   error = codeError(codes.DeadlineExceeded)
	ErrNotFound           error = codeError(codes.NotFound)
	ErrAlreadyExists      error = codeError(codes.AlreadyExists)
	ErrPermissionDenied   error = codeError(codes.PermissionDenied)
	ErrResourceExhausted  error = codeError(codes.ResourceExhausted)
	ErrFailedPrecondition error = codeError(codes.FailedPrecondition)
	ErrAborted            error = codeError(codes.Aborted)
	ErrOutOfRange         error = codeError(codes.OutOfRange)
	ErrUnimplemented      error = codeError(codes.Unimplemented)
	ErrInternal           error = codeError(codes.Internal)
	ErrUnavailable        error = codeError(codes.Unavailable)
	ErrDataLoss           error = codeError(codes.DataLoss)
	ErrUnauthenticated    error = codeError(codes.Unauthenticated)
)

var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

func codeName(code codes.Code) string {
	if name, ok := codeNames[code]; ok {
		return name
	}
	return code.String()
}

// ProtocolError says the server broke the tokenwire stream contract: a gap or
// repeat in the sequence, a wrong offset, an event after Completed, a stream
// that ended without Completed.
type ProtocolError struct {
	Message string
	// The last sequence received in order before the break.
	LastSequence uint32
}

func (e *ProtocolError) Error() string { return "tokenwire protocol error: " + e.Message }

// IntegrityError says what was received does not hash to what the server
// says it sent. It is also a *ProtocolError for errors.As.
type IntegrityError struct {
	ProtocolError
}

func (e *IntegrityError) Error() string { return "tokenwire integrity error: " + e.Message }

// Unwrap exposes the embedded ProtocolError to errors.As.
func (e *IntegrityError) Unwrap() error { return &e.ProtocolError }

func protocolError(last uint32, format string, args ...any) error {
	return &ProtocolError{Message: fmt.Sprintf(format, args...), LastSequence: last}
}

func integrityError(last uint32, format string, args ...any) error {
	return &IntegrityError{ProtocolError{Message: fmt.Sprintf(format, args...), LastSequence: last}}
}

// FromError maps an error returned by a generated stub (and the call's
// trailing metadata, which may be nil) to an *Error. Errors that carry no
// gRPC status, and errors that already are tokenwire errors, are returned
// unchanged. A context error becomes CANCELLED or DEADLINE_EXCEEDED.
func FromError(err error, trailer metadata.MD) error {
	if err == nil {
		return nil
	}
	var twErr *Error
	var protoErr *ProtocolError
	if errors.As(err, &twErr) || errors.As(err, &protoErr) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		st = status.FromContextError(err)
		if st.Code() == codes.Unknown {
			return err
		}
	}
	return fromStatus(st, trailer)
}

func fromStatus(st *status.Status, trailer metadata.MD) *Error {
	e := &Error{
		Code:     st.Code(),
		Message:  st.Message(),
		Metadata: map[string]string{},
		Trailers: metadata.MD{},
		status:   st,
	}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.Reason, e.Domain = d.GetReason(), d.GetDomain()
			for k, v := range d.GetMetadata() {
				e.Metadata[k] = v
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{v.GetField(), v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			e.RetryDelay, e.HasRetryDelay = d.GetRetryDelay().AsDuration(), true
		case *errdetails.QuotaFailure:
			for _, v := range d.GetViolations() {
				e.QuotaViolations = append(e.QuotaViolations, QuotaViolation{v.GetSubject(), v.GetDescription()})
			}
		}
	}
	for key, values := range trailer {
		if len(key) > 4 && key[len(key)-4:] == "-bin" {
			continue
		}
		e.Trailers[key] = append([]string(nil), values...)
	}
	last := ""
	if values := trailer.Get(LastSequenceTrailer); len(values) > 0 {
		last = values[0]
	} else if value, ok := e.Metadata["lastSequence"]; ok {
		last = value
	}
	if n, err := strconv.ParseUint(last, 10, 32); err == nil {
		e.LastSequence, e.HasLastSequence = uint32(n), true
	}
	return e
}

// worthResuming: a dropped connection (UNAVAILABLE with no tokenwire
// ErrorInfo) or a replica that stopped while the response, shared through
// Redis, went on (SERVER_STOPPING); not a response that failed on the server.
func worthResuming(err error) bool {
	var twErr *Error
	if !errors.As(err, &twErr) || twErr.Code != codes.Unavailable {
		return false
	}
	return twErr.Domain == "" || twErr.Reason == "SERVER_STOPPING"
}
