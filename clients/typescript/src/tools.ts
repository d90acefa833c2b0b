/**
 * Tools, tool choices and response formats from plain values, OpenAI-style
 * objects included (the Python client's `tokenwire.tools`):
 *
 *   const stream = client.stream("Weather in Paris?", {
 *     tools: [{ type: "function", function: { name: "get_weather", parameters: {...} } }],
 *     toolChoice: "required",
 *   });
 *
 * A JSON Schema is a plain object: the generated messages hold
 * `google.protobuf.Struct` fields as `JsonObject`.
 */

import { create, type JsonObject } from "@bufbuild/protobuf";

import {
  type ChatMessage,
  ChatMessageSchema,
  type ResponseFormat,
  ResponseFormatSchema,
  ResponseFormatType,
  Role,
  type Tool,
  type ToolChoice,
  ToolChoiceMode,
  ToolChoiceSchema,
  ToolSchema,
} from "./gen/tokenwire/v1/respond_pb.js";
import type { ToolCall } from "./stream.js";

/** A function tool: OpenAI's `{type: "function", function: {...}}` or the bare `{name, ...}`. */
export interface FunctionSpec {
  name: string;
  description?: string;
  parameters?: JsonObject;
  strict?: boolean;
}
export type ToolSpec = FunctionSpec | { type?: "function"; function: FunctionSpec } | Tool;
/** `auto`, `none`, `required`, a tool's name, `{type: "function", function: {name}}`, or the message. */
export type ToolChoiceSpec = string | { type?: "function"; function: { name: string } } | ToolChoice;
/** `text`, `json_object`, OpenAI's `{type: "json_schema", json_schema: {name, schema, strict}}`, or the message. */
export type ResponseFormatSpec =
  | "text"
  | "json_object"
  | { type: "text" | "json_object"; strict?: boolean }
  | { type: "json_schema"; json_schema: { name?: string; schema: JsonObject; strict?: boolean } }
  | ResponseFormat;

function isMessage(value: unknown, typeName: string): boolean {
  return typeof value === "object" && value !== null && (value as { $typeName?: string }).$typeName === typeName;
}

/** One tool; `strict` applies where the spec does not say. */
export function tool(spec: ToolSpec, strict?: boolean): Tool {
  if (isMessage(spec, "tokenwire.v1.Tool")) return spec as Tool;
  let body = spec as FunctionSpec;
  if ("function" in spec) {
    const kind = (spec as { type?: string }).type ?? "function";
    if (kind !== "function") throw new TypeError(`tool type ${kind}: only function tools are supported`);
    body = spec.function;
  }
  if (typeof body.name !== "string" || !body.name) {
    throw new TypeError(`a tool needs a name: ${JSON.stringify(spec)}`);
  }
  return create(ToolSchema, {
    name: body.name,
    description: body.description ?? "",
    ...(body.parameters !== undefined ? { parameters: body.parameters } : {}),
    strict: body.strict ?? strict ?? false,
  });
}

/** `tool` for each spec. */
export function tools(specs: readonly ToolSpec[], strict?: boolean): Tool[] {
  return specs.map((spec) => tool(spec, strict));
}

const CHOICE_MODES: Record<string, ToolChoiceMode> = {
  auto: ToolChoiceMode.AUTO,
  none: ToolChoiceMode.NONE,
  required: ToolChoiceMode.REQUIRED,
};

/** `auto`, `none`, `required`, or the name of the one tool the model must call. */
export function toolChoice(choice: ToolChoiceSpec): ToolChoice {
  if (isMessage(choice, "tokenwire.v1.ToolChoice")) return choice as ToolChoice;
  if (typeof choice === "object") {
    const name = (choice as { function: { name: string } }).function.name;
    return create(ToolChoiceSchema, { choice: { case: "functionName", value: name } });
  }
  if (!choice) throw new TypeError("an empty tool choice");
  const mode = CHOICE_MODES[choice.toLowerCase()];
  return create(ToolChoiceSchema, {
    choice: mode !== undefined ? { case: "mode", value: mode } : { case: "functionName", value: choice },
  });
}

/** The text must be JSON valid against `schema` (`strict`: stop early once it cannot be). */
export function jsonSchemaFormat(schema: JsonObject, options: { name?: string; strict?: boolean } = {}): ResponseFormat {
  return create(ResponseFormatSchema, {
    type: ResponseFormatType.JSON_SCHEMA,
    schemaName: options.name ?? "",
    jsonSchema: schema,
    strict: options.strict ?? false,
  });
}

/** The text must be one JSON object. */
export function jsonObjectFormat(strict = false): ResponseFormat {
  return create(ResponseFormatSchema, { type: ResponseFormatType.JSON_OBJECT, strict });
}

/** `text`, `json_object`, or an OpenAI-style response_format object. */
export function responseFormat(spec: ResponseFormatSpec): ResponseFormat {
  if (isMessage(spec, "tokenwire.v1.ResponseFormat")) return spec as ResponseFormat;
  const value = typeof spec === "string" ? { type: spec } : (spec as Exclude<ResponseFormatSpec, string | ResponseFormat>);
  switch (value.type) {
    case "text":
      return create(ResponseFormatSchema, { type: ResponseFormatType.TEXT });
    case "json_object":
      return jsonObjectFormat("strict" in value ? Boolean(value.strict) : false);
    case "json_schema": {
      const body = (value as { json_schema: { name?: string; schema: JsonObject; strict?: boolean } }).json_schema;
      return jsonSchemaFormat(body.schema, {
        ...(body.name !== undefined ? { name: body.name } : {}),
        ...(body.strict !== undefined ? { strict: body.strict } : {}),
      });
    }
    default:
      throw new TypeError(`response format type ${String((value as { type: unknown }).type)}`);
  }
}

/** A tool's answer (ROLE_TOOL) to the call `toolCallId`; anything but a string is sent as JSON. */
export function toolResultMessage(toolCallId: string, content: unknown): ChatMessage {
  if (!toolCallId) throw new TypeError("a tool result needs the id of the call it answers");
  return create(ChatMessageSchema, {
    role: Role.TOOL,
    content: typeof content === "string" ? content : JSON.stringify(content),
    toolCallId,
  });
}

/** An earlier assistant turn with the calls it made (`Result.toolCalls`). */
export function assistantMessage(content: string, calls: readonly ToolCall[] = []): ChatMessage {
  return create(ChatMessageSchema, {
    role: Role.ASSISTANT,
    content,
    toolCalls: calls.map((call) => ({ id: call.id, name: call.name, arguments: call.arguments })),
  });
}
