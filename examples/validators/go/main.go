// Command compliance-validator is a tokenwire validator in Go: it implements
// tokenwire.v1.ValidatorService with the stubs of clients/go.
//
//   - FAIL on forbidden claims ("guaranteed returns", "risk-free", "can't
//     lose"...): such text must never reach a customer.
//   - ESCALATE numbers that look like financial advice ("buy 100 shares",
//     "invest $5,000", "a 12% annual return"): a person should look first.
//   - PASS anything else.
//
// Validate judges the final payload; ValidateStream judges released text
// window by window, fails as soon as a forbidden claim appears (naming the
// window it starts in, so tokenwire retracts from there) and gives its
// verdict on the rest at the end. Offsets are UTF-8 bytes, which is what Go's
// regexp reports.
//
//	go run . -port 7070
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"regexp"
	"sort"
	"syscall"

	"google.golang.org/grpc"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
)

// The same rules as examples/validators/python (RE2 syntax).
var (
	forbidden = regexp.MustCompile(
		`(?i)\b(guaranteed\s+(?:returns?|profits?|gains?|income)|risk[-\s]free|` +
			`(?:can(?:no|')t|cannot)\s+lose|no\s+risk\s+(?:at\s+all|whatsoever))\b`)
	advice = regexp.MustCompile(
		`(?i)\b(?:buy|sell|invest|put|allocate|move)\b[^.\n]{0,40}?` +
			`(?:\$\s?\d[\d,]*(?:\.\d+)?|\d+(?:\.\d+)?\s?%|\d[\d,]*\s+shares?)` +
			`|\b\d+(?:\.\d+)?\s?%\s+(?:annual\s+|yearly\s+|monthly\s+)?(?:returns?|yields?|gains?)\b`)
)

func findings(pattern *regexp.Regexp, text, code, message string) []*pb.CheckViolation {
	var found []*pb.CheckViolation
	for _, span := range pattern.FindAllStringIndex(text, -1) {
		found = append(found, &pb.CheckViolation{
			Code: code, Message: message, Start: uint32(span[0]), End: uint32(span[1]),
		})
	}
	return found
}

func forbiddenClaims(text string) []*pb.CheckViolation {
	return findings(forbidden, text, "FORBIDDEN_CLAIM", "a claim no answer may make")
}

// judge is the verdict on a whole text: FAIL beats ESCALATE beats PASS.
func judge(text string) *pb.ValidateResponse {
	if claims := forbiddenClaims(text); len(claims) > 0 {
		return &pb.ValidateResponse{
			Outcome: pb.ValidationOutcome_VALIDATION_OUTCOME_FAIL, Violations: claims,
			Reason: "forbidden claim",
		}
	}
	if found := findings(advice, text, "NUMERIC_ADVICE", "numbers that look like financial advice"); len(found) > 0 {
		return &pb.ValidateResponse{
			Outcome: pb.ValidationOutcome_VALIDATION_OUTCOME_ESCALATE, Violations: found,
			Reason: "looks like financial advice",
		}
	}
	return &pb.ValidateResponse{Outcome: pb.ValidationOutcome_VALIDATION_OUTCOME_PASS}
}

type compliance struct {
	pb.UnimplementedValidatorServiceServer
}

func (compliance) Validate(_ context.Context, request *pb.ValidateRequest) (*pb.ValidateResponse, error) {
	return judge(request.GetFinalText()), nil
}

func (compliance) ValidateStream(stream grpc.BidiStreamingServer[pb.ValidateStreamRequest, pb.ValidateStreamResponse]) error {
	text := ""
	var starts []uint32 // byte offset of each window
	for {
		request, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch event := request.GetEvent().(type) {
		case *pb.ValidateStreamRequest_Window:
			starts = append(starts, event.Window.GetOffset())
			text += event.Window.GetText()
			if claims := forbiddenClaims(text); len(claims) > 0 {
				// Stop the release now, from the window the first claim starts in.
				first := claims[0].GetStart()
				index := sort.Search(len(starts), func(i int) bool { return starts[i] > first }) - 1
				return stream.Send(&pb.ValidateStreamResponse{
					Outcome: pb.ValidationOutcome_VALIDATION_OUTCOME_FAIL, Violations: claims,
					Reason: "forbidden claim", WindowOffset: starts[max(0, index)],
				})
			}
		case *pb.ValidateStreamRequest_End:
			final := text
			if event.End.GetDiverged() {
				final = event.End.GetFinalText()
			}
			verdict := judge(final)
			return stream.Send(&pb.ValidateStreamResponse{
				Outcome: verdict.GetOutcome(), Violations: verdict.GetViolations(),
				Reason: verdict.GetReason(),
			})
		}
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 7070, "port; 0 picks a free one (printed)")
	flag.Parse()
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, fmt.Sprint(*port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "compliance-validator:", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	pb.RegisterValidatorServiceServer(server, compliance{})
	fmt.Printf("compliance validator listening on %s\n", listener.Addr())
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-stop
		server.GracefulStop()
	}()
	if err := server.Serve(listener); err != nil {
		fmt.Fprintln(os.Stderr, "compliance-validator:", err)
		os.Exit(1)
	}
}
