package tokenwire

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/protobuf/types/known/structpb"

	pb "github.com/tokenwire/tokenwire/clients/go/gen/tokenwire/v1"
)

// Tools, tool choices and response formats from plain Go values and JSON,
// OpenAI-style documents included:
//
//	tools, err := tokenwire.ToolsFromJSON(data, false) // [{"type":"function","function":{...}}, {"name":...}]
//	stream := client.Stream(ctx, tokenwire.Request{
//		Prompt: "Weather in Paris?", Tools: tools, ToolChoice: tokenwire.ChooseTool("required"),
//	})

// FunctionTool is a tool the model may call; parameters is its JSON Schema
// (nil: no arguments).
func FunctionTool(name, description string, parameters map[string]any, strict bool) (*pb.Tool, error) {
	if name == "" {
		return nil, errors.New("tokenwire: a tool needs a name")
	}
	tool := &pb.Tool{Name: name, Description: description, Strict: strict}
	if parameters != nil {
		schema, err := toStruct(parameters)
		if err != nil {
			return nil, fmt.Errorf("tokenwire: tool %s parameters: %w", name, err)
		}
		tool.Parameters = schema
	}
	return tool, nil
}

// toStruct goes through JSON, so any JSON-able map (ints, nested slices) fits a Struct.
func toStruct(value map[string]any) (*structpb.Struct, error) {
	data, err := json.Marshal(value)
	if err != nil {
		return nil, err
	}
	var plain map[string]any
	if err := json.Unmarshal(data, &plain); err != nil {
		return nil, err
	}
	return structpb.NewStruct(plain)
}

type toolDocument struct {
	Type        string         `json:"type"`
	Function    *toolDocument  `json:"function"`
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  map[string]any `json:"parameters"`
	Strict      *bool          `json:"strict"`
}

// ToolsFromJSON reads a JSON list of tools, each OpenAI-style
// {"type":"function","function":{"name","description","parameters","strict"}}
// or bare {"name",...}; strict applies to the tools that do not say.
func ToolsFromJSON(data []byte, strict bool) ([]*pb.Tool, error) {
	var documents []toolDocument
	if err := json.Unmarshal(data, &documents); err != nil {
		return nil, fmt.Errorf("tokenwire: tools: %w", err)
	}
	tools := make([]*pb.Tool, 0, len(documents))
	for _, document := range documents {
		body := document
		if document.Function != nil {
			if document.Type != "" && document.Type != "function" {
				return nil, fmt.Errorf("tokenwire: tool type %q: only function tools are supported", document.Type)
			}
			body = *document.Function
		}
		own := strict
		if body.Strict != nil {
			own = *body.Strict
		}
		tool, err := FunctionTool(body.Name, body.Description, body.Parameters, own)
		if err != nil {
			return nil, err
		}
		tools = append(tools, tool)
	}
	return tools, nil
}

// ChooseTool is "auto", "none", "required", or the name of the one tool the
// model must call.
func ChooseTool(choice string) *pb.ToolChoice {
	switch strings.ToLower(choice) {
	case "auto":
		return &pb.ToolChoice{Choice: &pb.ToolChoice_Mode{Mode: pb.ToolChoiceMode_TOOL_CHOICE_MODE_AUTO}}
	case "none":
		return &pb.ToolChoice{Choice: &pb.ToolChoice_Mode{Mode: pb.ToolChoiceMode_TOOL_CHOICE_MODE_NONE}}
	case "required":
		return &pb.ToolChoice{Choice: &pb.ToolChoice_Mode{Mode: pb.ToolChoiceMode_TOOL_CHOICE_MODE_REQUIRED}}
	}
	return &pb.ToolChoice{Choice: &pb.ToolChoice_FunctionName{FunctionName: choice}}
}

// JSONSchemaFormat: the text must be JSON valid against schema (strict: stop
// generation once it no longer can be).
func JSONSchemaFormat(name string, schema map[string]any, strict bool) (*pb.ResponseFormat, error) {
	value, err := toStruct(schema)
	if err != nil {
		return nil, fmt.Errorf("tokenwire: json schema: %w", err)
	}
	return &pb.ResponseFormat{
		Type: pb.ResponseFormatType_RESPONSE_FORMAT_TYPE_JSON_SCHEMA, SchemaName: name, JsonSchema: value, Strict: strict,
	}, nil
}

// JSONObjectFormat: the text must be one JSON object.
func JSONObjectFormat(strict bool) *pb.ResponseFormat {
	return &pb.ResponseFormat{Type: pb.ResponseFormatType_RESPONSE_FORMAT_TYPE_JSON_OBJECT, Strict: strict}
}

// ToolResultMessage is a tool's answer (ROLE_TOOL) to the call toolCallID.
func ToolResultMessage(toolCallID, content string) *pb.ChatMessage {
	return &pb.ChatMessage{Role: pb.Role_ROLE_TOOL, Content: content, ToolCallId: toolCallID}
}

// AssistantMessage is an earlier assistant turn with the calls it made
// (Result.ToolCalls), for the request that carries the tools' answers.
func AssistantMessage(content string, calls []ToolCall) *pb.ChatMessage {
	message := &pb.ChatMessage{Role: pb.Role_ROLE_ASSISTANT, Content: content}
	for _, call := range calls {
		message.ToolCalls = append(message.ToolCalls, call.Proto())
	}
	return message
}
