package tokenwire_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"testing"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

func chunk(sequence uint32, text string, offset uint32) *pb.StreamRespondResponse {
	return &pb.StreamRespondResponse{Event: &pb.StreamRespondResponse_Chunk{Chunk: &pb.TokenChunk{
		ResponseId: "r", Sequence: sequence, Text: text, TextOffset: offset,
	}}}
}

func completed(text, final string, last uint32, status pb.VerificationStatus, retractFrom uint32) *pb.StreamRespondResponse {
	sum := sha256.Sum256([]byte(text))
	return &pb.StreamRespondResponse{Event: &pb.StreamRespondResponse_Completed{Completed: &pb.Completed{
		ResponseId: "r", FinalText: final, FinalSha256: hex.EncodeToString(sum[:]),
		ChunkCount: last, LastSequence: last,
		Verification: &pb.Verification{Status: status, RetractFromSequence: retractFrom},
	}}}
}

func feed(t *testing.T, a *tokenwire.Assembler, messages ...*pb.StreamRespondResponse) ([]tokenwire.Event, error) {
	t.Helper()
	var all []tokenwire.Event
	for _, message := range messages {
		events, err := a.Feed(message)
		if err != nil {
			return all, err
		}
		all = append(all, events...)
	}
	return all, nil
}

func wantProtocolError(t *testing.T, err error, integrity bool) {
	t.Helper()
	var protocol *tokenwire.ProtocolError
	if !errors.As(err, &protocol) {
		t.Fatalf("err %v (%T), want *ProtocolError", err, err)
	}
	var integrityErr *tokenwire.IntegrityError
	if errors.As(err, &integrityErr) != integrity {
		t.Fatalf("err %v: integrity error %v, want %v", err, !integrity, integrity)
	}
}

func TestAssemblerRejectsAGap(t *testing.T) {
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "ab", 0), chunk(3, "cd", 2))
	wantProtocolError(t, err, false)
}

func TestAssemblerRejectsARepeat(t *testing.T) {
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "ab", 0), chunk(1, "ab", 0))
	wantProtocolError(t, err, false)
}

func TestAssemblerRejectsAWrongOffset(t *testing.T) {
	// "é" is two UTF-8 bytes: the next offset is 2, not 1.
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "é", 0), chunk(2, "x", 1))
	wantProtocolError(t, err, false)
}

func TestAssemblerRejectsADigestMismatch(t *testing.T) {
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "ab", 0),
		completed("something else", "", 1, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0))
	wantProtocolError(t, err, true)
}

func TestAssemblerRejectsEventsAfterCompleted(t *testing.T) {
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "ab", 0),
		completed("ab", "", 1, pb.VerificationStatus_VERIFICATION_STATUS_VERIFIED, 0), chunk(2, "cd", 2))
	wantProtocolError(t, err, false)
}

func TestAssemblerRejectsAMissingVerification(t *testing.T) {
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "ab", 0),
		completed("ab", "", 1, pb.VerificationStatus_VERIFICATION_STATUS_UNSPECIFIED, 0))
	wantProtocolError(t, err, false)
}

func TestAssemblerTurnsADivergenceIntoARetraction(t *testing.T) {
	events, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "Hello ", 0), chunk(2, "wor", 6),
		completed("Hello there", "Hello there", 2, pb.VerificationStatus_VERIFICATION_STATUS_DIVERGED, 2))
	if err != nil {
		t.Fatal(err)
	}
	retraction, ok := events[2].(*tokenwire.Retraction)
	if !ok || retraction.FromSequence != 2 || retraction.FromOffset != 6 || retraction.KeptText != "Hello " ||
		retraction.FinalText != "Hello there" {
		t.Fatalf("events %v", events)
	}
	completion := events[3].(*tokenwire.Completion)
	if completion.Result.Text != "Hello there" || !completion.Result.Verified() || completion.Result.Retraction != retraction {
		t.Fatalf("result %+v", completion.Result)
	}
}

func TestAssemblerRejectsARetractionThatRewritesKeptText(t *testing.T) {
	_, err := feed(t, tokenwire.NewAssembler(0), chunk(1, "Hello ", 0), chunk(2, "wor", 6),
		completed("Bye", "Bye", 2, pb.VerificationStatus_VERIFICATION_STATUS_DIVERGED, 2))
	wantProtocolError(t, err, true)
}
