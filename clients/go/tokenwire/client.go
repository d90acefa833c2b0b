// Package tokenwire is the Go client of the tokenwire gRPC service.
//
// It sets a deadline on every call by default (60 s, like the Python
// client), checks every chunk of a stream (sequence, byte offset, response
// id), reassembles the text, verifies it against Completed.final_sha256,
// surfaces a server-side retraction as an explicit *Retraction event,
// resumes a resumable stream whose connection dropped, and maps gRPC status
// details (google.rpc ErrorInfo, BadRequest, RetryInfo, QuotaFailure) to
// *Error values usable with errors.As and errors.Is.
//
//	client, err := tokenwire.Dial("localhost:50051")
//	...
//	stream := client.Stream(ctx, tokenwire.Request{Prompt: "Explain backpressure", Mode: tokenwire.ModeStream})
//	for ev, err := range stream.Events() {
//		if err != nil { ... }
//		switch ev := ev.(type) {
//		case *tokenwire.Chunk:
//			fmt.Print(ev.Text)
//		case *tokenwire.Retraction:
//			redraw(ev.KeptText, ev.FinalText)
//		}
//	}
//	result := stream.Result() // .Text, .SHA256, .Verified(), .Completed
package tokenwire

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
)

const (
	// DefaultTarget is the address `tokenwire serve` listens on by default.
	DefaultTarget = "localhost:50051"
	// DefaultTimeout bounds every call whose context has no deadline.
	DefaultTimeout = 60 * time.Second
	// RequestIDHeader is the response header echoing the request id.
	RequestIDHeader = "x-request-id"
)

// Mode is how a streamed response is delivered.
type Mode string

const (
	ModeAuto     Mode = "auto"     // short answers as one chunk, long ones streamed (the default)
	ModeStream   Mode = "stream"   // chunks as soon as governance releases text
	ModeBuffered Mode = "buffered" // the whole governed payload as one chunk
)

var deliveryModes = map[Mode]pb.DeliveryMode{
	"":           pb.DeliveryMode_DELIVERY_MODE_AUTO,
	ModeAuto:     pb.DeliveryMode_DELIVERY_MODE_AUTO,
	ModeStream:   pb.DeliveryMode_DELIVERY_MODE_STREAM,
	ModeBuffered: pb.DeliveryMode_DELIVERY_MODE_BUFFERED,
}

// ResumePolicy is how a resumable stream survives a dropped connection:
// at most Attempts reconnects, each after Backoff*2^n with jitter (×0.5 to
// ×1.5), always within the call's deadline.
type ResumePolicy struct {
	Attempts int
	Backoff  time.Duration
}

// DefaultResumePolicy matches the Python client: 3 attempts from 100 ms.
var DefaultResumePolicy = ResumePolicy{Attempts: 3, Backoff: 100 * time.Millisecond}

func (p ResumePolicy) delay(attempt int) time.Duration {
	return time.Duration(float64(p.Backoff) * float64(int64(1)<<attempt) * (0.5 + rand.Float64()))
}

type options struct {
	timeout      time.Duration
	creds        credentials.TransportCredentials
	dialOptions  []grpc.DialOption
	metadata     []string
	resume       ResumePolicy
	stallTimeout time.Duration
	hook         func(Observation)
}

// Option configures a Client.
type Option func(*options)

// WithTimeout sets the deadline of calls whose context has none (default 60 s).
func WithTimeout(timeout time.Duration) Option { return func(o *options) { o.timeout = timeout } }

// WithTransportCredentials dials with TLS (see TLSCredentials); plaintext otherwise.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(o *options) { o.creds = creds }
}

// WithAPIKey sends `authorization: Bearer KEY` on every call.
func WithAPIKey(key string) Option {
	return func(o *options) { o.metadata = append(o.metadata, "authorization", "Bearer "+key) }
}

// WithMetadata adds request metadata (key, value pairs) to every call.
func WithMetadata(pairs ...string) Option {
	return func(o *options) { o.metadata = append(o.metadata, pairs...) }
}

// WithResumePolicy replaces DefaultResumePolicy; Attempts 0 never resumes.
func WithResumePolicy(policy ResumePolicy) Option { return func(o *options) { o.resume = policy } }

// WithStallTimeout sets how long a stream may wait for its next event before
// the client counts a stall (default DefaultStallTimeout; 0 counts none). A
// stall is counted, not fatal: the call's deadline still ends the stream.
func WithStallTimeout(timeout time.Duration) Option {
	return func(o *options) { o.stallTimeout = timeout }
}

// WithObservationHook calls hook with each ordering violation and stall the
// client's streams meet, after counting it (export them to your metrics).
// It runs on the goroutine that noticed (the reader's for a violation, a
// timer's for a stall), so it must be quick and safe for concurrent use.
func WithObservationHook(hook func(Observation)) Option {
	return func(o *options) { o.hook = hook }
}

// WithDialOptions adds grpc.DialOptions (interceptors, keepalive, ...) to Dial.
func WithDialOptions(dialOptions ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, dialOptions...) }
}

// TLSCredentials builds TLS credentials from PEM files: caFile to trust the
// server (the system roots when empty), certFile and keyFile to present a
// client certificate (mTLS; both or neither).
func TLSCredentials(caFile, certFile, keyFile string) (credentials.TransportCredentials, error) {
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("tokenwire: a client certificate needs both cert and key")
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("tokenwire: reading CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tokenwire: no certificate in %s", caFile)
		}
		config.RootCAs = pool
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("tokenwire: loading client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return credentials.NewTLS(config), nil
}

// Client calls one tokenwire server over one connection; safe for
// concurrent use (reuse it: connections are expensive).
type Client struct {
	conn         *grpc.ClientConn
	stub         pb.RespondServiceClient
	timeout      time.Duration
	metadata     []string
	resume       ResumePolicy
	stallTimeout time.Duration
	observer     *observer
}

func newOptions(opts []Option) options {
	o := options{timeout: DefaultTimeout, resume: DefaultResumePolicy, stallTimeout: DefaultStallTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// Dial creates a client for target ("host:port"); plaintext unless
// WithTransportCredentials. The connection is made lazily, on the first call.
func Dial(target string, opts ...Option) (*Client, error) {
	o := newOptions(opts)
	creds := o.creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	conn, err := grpc.NewClient(target, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, o.dialOptions...)...)
	if err != nil {
		return nil, err
	}
	c := NewClient(pb.NewRespondServiceClient(conn), opts...)
	c.conn = conn
	return c, nil
}

// NewClient wraps a stub over a connection the caller owns (Close then
// does nothing); Dial-only options are ignored.
func NewClient(stub pb.RespondServiceClient, opts ...Option) *Client {
	o := newOptions(opts)
	return &Client{
		stub: stub, timeout: o.timeout, metadata: o.metadata, resume: o.resume,
		stallTimeout: o.stallTimeout, observer: &observer{hook: o.hook},
	}
}

// Observed returns the ordering violations and stalls this client's streams
// met since it was made (a snapshot; safe from any goroutine). A violation
// also ends its stream with a *ProtocolError; a stall does not end it.
func (c *Client) Observed() Observed { return c.observer.snapshot() }

// Close closes the connection Dial made.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// Stub is the generated stub, for calls this package does not wrap.
func (c *Client) Stub() pb.RespondServiceClient { return c.stub }

// callContext adds the client's metadata, and its default deadline when ctx has none.
func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if len(c.metadata) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, c.metadata...)
	}
	if _, ok := ctx.Deadline(); !ok && c.timeout > 0 {
		return context.WithTimeout(ctx, c.timeout)
	}
	return context.WithCancel(ctx)
}

// Request is what to ask: a prompt (or explicit messages) and options. The
// fields after Labels apply to streams only.
type Request struct {
	// Prompt becomes one ROLE_USER message (after System, if set).
	Prompt string
	// Messages are used as they are, after System, and before Prompt if both are set.
	Messages    []*pb.ChatMessage
	System      string
	Model       string // empty: the server's default model
	MaxTokens   int32  // 0: the server's default
	Temperature *float64
	TopP        *float64
	Stop        []string
	Seed        *int64
	Labels      map[string]string
	RequestID   string // empty: the server assigns one
	// Tools the model may call (FunctionTool, ToolsFromJSON), whether it may
	// (ChooseTool), and the shape of its text (JSONSchemaFormat, JSONObjectFormat).
	Tools          []*pb.Tool
	ToolChoice     *pb.ToolChoice
	ResponseFormat *pb.ResponseFormat

	Mode              Mode          // auto (default), stream or buffered
	MaxTokensPerChunk int32         // 0: the server's default
	MaxDelay          time.Duration // how long the server may hold tokens to fill a chunk
	OmitFinalText     bool          // Completed carries only the digest (the client holds the text)
	// Resumable keeps generation going on the server when the connection
	// drops, and makes the Stream reconnect and resume by sequence.
	Resumable bool
}

func (r Request) messages() []*pb.ChatMessage {
	var messages []*pb.ChatMessage
	if r.System != "" {
		messages = append(messages, &pb.ChatMessage{Role: pb.Role_ROLE_SYSTEM, Content: r.System})
	}
	messages = append(messages, r.Messages...)
	if r.Prompt != "" || len(r.Messages) == 0 {
		messages = append(messages, &pb.ChatMessage{Role: pb.Role_ROLE_USER, Content: r.Prompt})
	}
	return messages
}

func (r Request) params() *pb.GenerationParams {
	return &pb.GenerationParams{
		MaxTokens: r.MaxTokens, Temperature: r.Temperature, TopP: r.TopP, Stop: r.Stop, Seed: r.Seed,
	}
}

// RespondRequest is the unary request for r.
func (r Request) RespondRequest() *pb.RespondRequest {
	return &pb.RespondRequest{
		RequestId: r.RequestID, Model: r.Model, Messages: r.messages(), Params: r.params(), Labels: r.Labels,
		Tools: r.Tools, ToolChoice: r.ToolChoice, ResponseFormat: r.ResponseFormat,
	}
}

// StreamRequest is the streaming request for r.
func (r Request) StreamRequest() (*pb.StreamRespondRequest, error) {
	mode, ok := deliveryModes[r.Mode]
	if !ok {
		return nil, fmt.Errorf("tokenwire: unknown mode %q", r.Mode)
	}
	request := &pb.StreamRespondRequest{
		RequestId: r.RequestID, Model: r.Model, Messages: r.messages(), Params: r.params(), Labels: r.Labels,
		Tools: r.Tools, ToolChoice: r.ToolChoice, ResponseFormat: r.ResponseFormat,
		DeliveryMode:  mode,
		Chunking:      &pb.Chunking{MaxTokensPerChunk: r.MaxTokensPerChunk},
		OmitFinalText: r.OmitFinalText,
		Resumable:     r.Resumable,
	}
	if r.MaxDelay > 0 {
		request.Chunking.MaxDelay = durationpb.New(r.MaxDelay)
	}
	return request, nil
}

// Respond calls unary Respond and returns the verified payload.
func (c *Client) Respond(ctx context.Context, r Request) (*Result, error) {
	return c.RespondRequest(ctx, r.RespondRequest())
}

// RespondRequest calls unary Respond with a request built by hand.
func (c *Client) RespondRequest(ctx context.Context, request *pb.RespondRequest) (*Result, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	var header, trailer metadata.MD
	response, err := c.stub.Respond(ctx, request, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		return nil, FromError(err, trailer)
	}
	return unaryResult(response, first(header, RequestIDHeader))
}

// CancelResponse stops a response by id (Cancel); true when it was still
// running. Safe to call twice or after the response finished.
func (c *Client) CancelResponse(ctx context.Context, responseID string) (bool, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	var trailer metadata.MD
	answer, err := c.stub.Cancel(ctx, &pb.CancelRequest{ResponseId: responseID}, grpc.Trailer(&trailer))
	if err != nil {
		return false, FromError(err, trailer)
	}
	return answer.GetWasRunning(), nil
}

// Stream starts a StreamRespond. Nothing is sent until the first Recv (or
// Events, or Collect); every error, including a bad Request, comes from
// there. The call's deadline (ctx's, else the client's default) spans every
// resume. Close the stream if you stop reading before the end.
func (c *Client) Stream(ctx context.Context, r Request) *Stream {
	request, err := r.StreamRequest()
	s := c.StreamRequest(ctx, request)
	s.err = err
	return s
}

// StreamRequest starts a StreamRespond with a request built by hand.
func (c *Client) StreamRequest(ctx context.Context, request *pb.StreamRespondRequest) *Stream {
	return c.newStream(ctx, request, NewAssembler(0))
}

// Resume replays and continues an earlier response after the sequence the
// caller holds (for example after a process restart). The Result's Text
// then holds only the chunks after afterSequence; Completed still carries
// the server's verification of the whole.
func (c *Client) Resume(ctx context.Context, responseID string, afterSequence uint32) *Stream {
	request := &pb.StreamRespondRequest{Resume: &pb.ResumeFrom{ResponseId: responseID, AfterSequence: afterSequence}}
	return c.newStream(ctx, request, NewAssembler(afterSequence))
}

func (c *Client) newStream(ctx context.Context, request *pb.StreamRespondRequest, assembler *Assembler) *Stream {
	ctx, cancel := c.callContext(ctx)
	s := &Stream{
		stub: c.stub, ctx: ctx, cancel: cancel, request: request, assembler: assembler,
	}
	observe := func(kind ObservationKind, detail string) {
		c.observer.record(Observation{
			Kind: kind, ResponseID: s.assembler.ResponseID(), LastSequence: s.assembler.LastSequence(), Detail: detail,
		})
	}
	if assembler.Observe == nil {
		assembler.Observe = observe
	}
	if c.stallTimeout > 0 {
		s.stalls = &stallWatch{timeout: c.stallTimeout, record: c.observer.record}
	}
	if request.GetResumable() || request.GetResume() != nil {
		s.resume = c.resume
	}
	return s
}

func first(md metadata.MD, key string) string {
	if values := md.Get(key); len(values) > 0 {
		return values[0]
	}
	return ""
}
