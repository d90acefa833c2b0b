/**
 * Tool calls and structured output: fragments assembled next to the text and
 * checked like chunks (sequence, offsets, resume, retraction), the request
 * helpers, and a resume inside a call against a fake RespondService.
 */

import assert from "node:assert/strict";
import { once } from "node:events";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";

import {
  IntegrityError,
  ProtocolError,
  type RetractionEvent,
  StreamAssembler,
  type StreamEvent,
  TokenwireClient,
  type ToolCall,
  type ToolCallEvent,
  assistantMessage,
  parseArguments,
  pb,
  responseFormat,
  sha256Hex,
  toolChoice,
  toolResultMessage,
  tools,
} from "../src/index.js";

type Piece = string | [number, string];
const CALLS: Record<number, [string, string]> = { 0: ["call_0", "get_weather"], 1: ["call_1", "get_time"] };
/** Text, then call #0 in three fragments with call #1 between them, then text. */
const PIECES: Piece[] = [
  "Let me ",
  "check. ",
  [0, '{"city": '],
  [1, '{"tz": "CET"}'],
  [0, '"Paris", '],
  [0, '"unit": "°C"}'],
  "Done.",
];
const bytes = (s: string) => new TextEncoder().encode(s).length;

/** The chunks of `pieces` with the sequences and offsets a correct server sends. */
function script(pieces: Piece[]): pb.StreamRespondResponse[] {
  let textOffset = 0;
  const held = new Map<number, number>();
  return pieces.map((piece, i) => {
    const sequence = i + 1;
    if (typeof piece === "string") {
      const chunk = { responseId: "r", sequence, text: piece, textOffset };
      textOffset += bytes(piece);
      return create(pb.StreamRespondResponseSchema, { event: { case: "chunk", value: chunk } });
    }
    const [index, args] = piece;
    const offset = held.get(index);
    const [id, name] = offset === undefined ? CALLS[index]! : ["", ""];
    held.set(index, (offset ?? 0) + bytes(args));
    return create(pb.StreamRespondResponseSchema, {
      event: {
        case: "chunk",
        value: {
          responseId: "r",
          sequence,
          textOffset,
          toolCall: { index, id, name, arguments: args, argumentsOffset: offset ?? 0 },
        },
      },
    });
  });
}

function finalCalls(pieces: Piece[]): { id: string; name: string; arguments: string }[] {
  const args = new Map<number, string>();
  for (const piece of pieces) if (typeof piece !== "string") args.set(piece[0], (args.get(piece[0]) ?? "") + piece[1]);
  return [...args.keys()].sort().map((i) => ({ id: CALLS[i]![0], name: CALLS[i]![1], arguments: args.get(i)! }));
}

function completed(
  pieces: Piece[],
  options: { calls?: { id: string; name: string; arguments: string }[]; retractFrom?: number } = {},
): pb.StreamRespondResponse {
  const text = pieces.filter((p): p is string => typeof p === "string").join("");
  return create(pb.StreamRespondResponseSchema, {
    event: {
      case: "completed",
      value: {
        responseId: "r",
        finalText: text,
        finalSha256: sha256Hex(text),
        chunkCount: pieces.length,
        lastSequence: pieces.length,
        finishReason: pb.FinishReason.TOOL_CALLS,
        toolCalls: options.calls ?? finalCalls(pieces),
        verification: {
          status: options.retractFrom ? pb.VerificationStatus.DIVERGED : pb.VerificationStatus.VERIFIED,
          retractFromSequence: options.retractFrom ?? 0,
        },
      },
    },
  });
}

function fragment(sequence: number, index: number, args: string, offset: number, textOffset: number) {
  return create(pb.StreamRespondResponseSchema, {
    event: {
      case: "chunk",
      value: { responseId: "r", sequence, textOffset, toolCall: { index, arguments: args, argumentsOffset: offset } },
    },
  });
}

function feedAll(assembler: StreamAssembler, messages: pb.StreamRespondResponse[]): StreamEvent[] {
  return messages.flatMap((m) => assembler.feed(m));
}

test("fragments assemble into calls next to the text", () => {
  const assembler = new StreamAssembler();
  const events: StreamEvent[] = [];
  const messages = script(PIECES);
  for (const [i, message] of messages.entries()) {
    events.push(...assembler.feed(message));
    if (i === 4) {
      assert.deepEqual(assembler.toolCalls, [
        { index: 0, id: "call_0", name: "get_weather", arguments: '{"city": "Paris", ', complete: false },
        { index: 1, id: "call_1", name: "get_time", arguments: '{"tz": "CET"}', complete: false },
      ]);
      assert.equal(assembler.text, "Let me check. ");
    }
  }
  const fragments = events.filter((e): e is ToolCallEvent => e.type === "tool_call");
  assert.deepEqual(
    fragments.map((f) => [f.sequence, f.index, f.argumentsOffset, f.first]),
    [
      [3, 0, 0, true],
      [4, 1, 0, true],
      [5, 0, 9, false],
      [6, 0, 18, false],
    ],
  );
  const lastChunk = events.at(-1);
  assert.equal(lastChunk?.type === "chunk" && lastChunk.textOffset, bytes("Let me check. "));
  const done = assembler.feed(completed(PIECES));
  const result = done.at(-1)?.type === "completion" ? assembler.result! : undefined;
  assert.ok(result?.verified);
  assert.equal(result.text, "Let me check. Done.");
  assert.deepEqual(result.toolCalls[0], {
    index: 0,
    id: "call_0",
    name: "get_weather",
    arguments: '{"city": "Paris", "unit": "°C"}',
    complete: true,
  });
  assert.deepEqual(parseArguments(result.toolCalls[0]!), { city: "Paris", unit: "°C" });
  assert.deepEqual(assembler.toolCalls, result.toolCalls);
});

const MISPLACED: [string, pb.StreamRespondResponse, string][] = [
  ["an arguments gap", fragment(4, 0, '"x"}', 20, 14), "offset_mismatch"],
  ["an arguments overlap", fragment(4, 0, '"x"}', 3, 14), "offset_mismatch"],
  ["a text offset advanced by a fragment", fragment(4, 0, '"x"}', 9, 23), "offset_mismatch"],
  ["a sequence gap", fragment(5, 0, '"x"}', 9, 14), "sequence_gap"],
  ["a replayed fragment", script(PIECES)[2]!, "sequence_repeat"],
];
for (const [name, bad, kind] of MISPLACED) {
  test(`a misplaced fragment is an ordering violation: ${name}`, () => {
    const heard: string[] = [];
    const assembler = new StreamAssembler({ observe: (k) => heard.push(k) });
    feedAll(assembler, script(PIECES.slice(0, 3)));
    assert.throws(
      () => assembler.feed(bad),
      (error: unknown) => error instanceof ProtocolError && error.lastSequence === 3,
    );
    assert.deepEqual(heard, [kind]);
  });
}

test("fragments that break the shape are protocol errors", () => {
  const both = fragment(1, 0, "{}", 0, 0);
  if (both.event.case === "chunk") both.event.value.text = "hi";
  assert.throws(() => new StreamAssembler().feed(both), /both text and a tool-call fragment/);
  assert.throws(() => new StreamAssembler().feed(fragment(1, 1, "{}", 0, 0)), /#1 begins before #0/);
});

test("verified calls must equal their fragments", () => {
  const calls = finalCalls(PIECES);
  calls[0]!.arguments = '{"city": "Lyon"}';
  const assembler = new StreamAssembler();
  feedAll(assembler, script(PIECES));
  assert.throws(() => assembler.feed(completed(PIECES, { calls })), IntegrityError);
});

test("a retraction drops fragments from its sequence and Completed's calls replace them", () => {
  const calls = finalCalls(PIECES);
  calls[0]!.arguments = '{"city": "[CITY]", "unit": "°C"}';
  const assembler = new StreamAssembler();
  feedAll(assembler, script(PIECES));
  const events = assembler.feed(completed(PIECES, { calls, retractFrom: 5 }));
  const retraction = events[0] as RetractionEvent;
  assert.equal(retraction.type, "retraction");
  assert.equal(retraction.keptText, "Let me check. ");
  assert.deepEqual(
    retraction.keptToolCalls.map((c: ToolCall) => c.arguments),
    ['{"city": ', '{"tz": "CET"}'],
  );
  assert.equal(assembler.result?.toolCalls[0]?.arguments, calls[0]!.arguments);
  assert.deepEqual(retraction.finalToolCalls, assembler.result?.toolCalls);

  const bad = finalCalls(PIECES);
  bad[0]!.arguments = '{"town": "Paris"}';
  const other = new StreamAssembler();
  feedAll(other, script(PIECES));
  assert.throws(() => other.feed(completed(PIECES, { calls: bad, retractFrom: 5 })), /not a prefix/);
});

test("resumed by hand inside a call", () => {
  const assembler = new StreamAssembler({ resumedAfter: 4 });
  feedAll(assembler, script(PIECES).slice(4));
  assert.deepEqual(
    assembler.toolCalls.map((c) => c.arguments),
    ['"Paris", "unit": "°C"}'],
  );
  assembler.feed(completed(PIECES));
  assert.equal(assembler.result?.toolCalls[0]?.arguments, '{"city": "Paris", "unit": "°C"}');
});

test("request helpers take plain objects", () => {
  const [weather, time] = tools([
    {
      type: "function",
      function: { name: "get_weather", parameters: { type: "object", required: ["city"] }, strict: true },
    },
    { name: "get_time" },
  ]);
  assert.equal(weather?.name, "get_weather");
  assert.ok(weather?.strict && !time?.strict);
  assert.deepEqual(weather?.parameters, { type: "object", required: ["city"] });
  assert.throws(() => tools([{ name: "" }]), /needs a name/);
  assert.equal(toolChoice("required").choice.value, pb.ToolChoiceMode.REQUIRED);
  assert.deepEqual(toolChoice("get_weather").choice, { case: "functionName", value: "get_weather" });
  const format = responseFormat({ type: "json_schema", json_schema: { name: "a", schema: { type: "object" }, strict: true } });
  assert.equal(format.type, pb.ResponseFormatType.JSON_SCHEMA);
  assert.ok(format.strict && format.schemaName === "a");
  assert.equal(responseFormat("json_object").type, pb.ResponseFormatType.JSON_OBJECT);
  const answer = toolResultMessage("call_0", { temperatureC: 21 });
  assert.equal(answer.role, pb.Role.TOOL);
  assert.equal(answer.content, '{"temperatureC":21}');
  const turn = assistantMessage("", [{ index: 0, id: "call_0", name: "f", arguments: "{}", complete: true }]);
  assert.equal(turn.toolCalls[0]?.id, "call_0");
});

test("a resumed stream continues inside a call", async () => {
  const messages = [...script(PIECES), completed(PIECES)];
  const requests: pb.StreamRespondRequest[] = [];
  const routes = (router: ConnectRouter) => {
    router.service(pb.RespondService, {
      async *streamRespond(request) {
        requests.push(request);
        if (request.resume) {
          yield* messages.slice(request.resume.afterSequence);
          return;
        }
        yield* messages.slice(0, 5);
        throw new ConnectError("connection reset", Code.Unavailable);
      },
    });
  };
  const server = http2.createServer(connectNodeAdapter({ routes, grpc: true }));
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  const client = new TokenwireClient(`127.0.0.1:${port}`);
  try {
    const stream = client.stream("weather?", {
      resumable: true,
      tools: [{ name: "get_weather", parameters: { type: "object" } }],
      toolChoice: "get_weather",
      responseFormat: "json_object",
    });
    const result = await stream.collect();
    assert.equal(stream.resumes, 1);
    assert.equal(requests[1]?.resume?.afterSequence, 5);
    assert.ok(result.verified);
    assert.equal(result.text, "Let me check. Done.");
    assert.deepEqual(
      stream.toolCalls.map((c) => c.arguments),
      ['{"city": "Paris", "unit": "°C"}', '{"tz": "CET"}'],
    );
    const sent = requests[0]!;
    assert.equal(sent.tools[0]?.name, "get_weather");
    assert.deepEqual(sent.toolChoice?.choice, { case: "functionName", value: "get_weather" });
    assert.equal(sent.responseFormat?.type, pb.ResponseFormatType.JSON_OBJECT);
  } finally {
    client.close();
    server.close();
  }
});
