package tokenwire_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

func ExampleClient_Stream() {
	client, err := tokenwire.Dial("localhost:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	stream := client.Stream(context.Background(), tokenwire.Request{
		Prompt: "Explain backpressure", Mode: tokenwire.ModeStream, Resumable: true,
	})
	for event, err := range stream.Events() {
		if err != nil {
			log.Fatal(err)
		}
		switch event := event.(type) {
		case *tokenwire.Chunk:
			fmt.Print(event.Text)
		case *tokenwire.Retraction:
			fmt.Printf("\n[retracted from chunk %d]\n%s", event.FromSequence, event.FinalText)
		}
	}
	result := stream.Result()
	fmt.Printf("\n%d chunks, sha256 %s verified=%v\n", result.ChunkCount, result.SHA256, result.Verified())
}

func ExampleError() {
	client, err := tokenwire.Dial("localhost:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	_, err = client.Respond(context.Background(), tokenwire.Request{Prompt: "x", MaxTokens: 1_000_000})
	var twErr *tokenwire.Error
	if errors.As(err, &twErr) && errors.Is(err, tokenwire.ErrInvalidArgument) {
		for _, violation := range twErr.FieldViolations {
			fmt.Println(twErr.Reason, violation.Field, violation.Description)
		}
	}
}
