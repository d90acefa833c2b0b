/**
 * The TypeScript client against a real `tokenwire serve`: checks, reassembly,
 * verification, retraction, resume across a cut connection, typed errors.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  type ChunkEvent,
  DeadlineExceeded,
  InvalidArgument,
  NotFound,
  ResourceExhausted,
  type RetractionEvent,
  type StreamEvent,
  TokenwireClient,
  TokenwireError,
  Unavailable,
  pb,
  sha256Hex,
} from "../src/index.js";
import { CuttableProxy, FAST_SIMULATOR, type Served, startServe, tempFile } from "./helpers.js";

const SLOW = { "tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "60" };

async function drain(stream: AsyncIterable<StreamEvent>): Promise<StreamEvent[]> {
  const events: StreamEvent[] = [];
  for await (const event of stream) events.push(event);
  return events;
}

async function rejection<T extends TokenwireError>(
  promise: Promise<unknown>,
  type: abstract new (...args: never[]) => T,
): Promise<T> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof type, `expected ${type.name}, got ${String(error)}`);
    return error;
  }
  assert.fail(`expected ${type.name}, the call succeeded`);
}

describe("against tokenwire serve", () => {
  let served: Served;
  let client: TokenwireClient;

  before(async () => {
    served = await startServe(...FAST_SIMULATOR, "--heartbeat-interval", "0.05");
    client = new TokenwireClient(served.address);
  });

  after(async () => {
    client?.close();
    await served?.stop();
  });

  test("a streamed answer is checked, reassembled and verified", async () => {
    const stream = client.stream("hello", {
      mode: "stream",
      requestId: "ts-1",
      maxTokensPerChunk: 2,
    });
    const events = await drain(stream);
    const chunks = events.filter((e): e is ChunkEvent => e.type === "chunk");
    const last = events.at(-1);
    assert.equal(last?.type, "completion");
    const result = stream.result!;
    assert.ok(result.verified);
    assert.equal(result.retraction, undefined);
    assert.equal(result.text, chunks.map((c) => c.text).join(""));
    assert.equal(result.text, result.completed.finalText);
    assert.equal(result.sha256, sha256Hex(result.text));
    assert.deepEqual(
      chunks.map((c) => c.sequence),
      chunks.map((_, i) => i + 1),
    );
    assert.equal(result.chunkCount, chunks.length);
    assert.equal(result.chunkCount, result.completed.lastSequence);
    assert.equal(result.requestId, "ts-1");
    assert.equal(result.completed.deliveryMode, pb.DeliveryMode.STREAM);
    assert.ok(chunks.every((c) => c.tokenCount <= 2));
    assert.ok(chunks.length > 1);
  });

  test("offsets count UTF-8 bytes, not UTF-16 units", async () => {
    const text = "naïve café — 日本語 🎉 done";
    const stream = client.stream(text, {
      model: "echo",
      mode: "stream",
      maxTokensPerChunk: 1,
      labels: { "tokenwire.sim/echo-token-chars": "2" },
    });
    const chunks = (await drain(stream)).filter((e): e is ChunkEvent => e.type === "chunk");
    let bytes = 0;
    for (const chunk of chunks) {
      assert.equal(chunk.textOffset, bytes);
      bytes += Buffer.byteLength(chunk.text, "utf8");
    }
    assert.equal(stream.result!.text, text);
    assert.ok(stream.result!.verified);
  });

  test("buffered delivery is one chunk, unary is none, and both agree", async () => {
    const buffered = await client.stream("same prompt", { seed: 5, mode: "buffered" }).collect();
    const unary = await client.respond("same prompt", { seed: 5 });
    assert.ok(buffered.verified && unary.verified);
    assert.equal(buffered.chunkCount, 1);
    assert.equal(buffered.completed.deliveryMode, pb.DeliveryMode.BUFFERED);
    assert.equal(unary.chunkCount, 0);
    assert.equal(unary.text, buffered.text);
    assert.ok(unary.requestId.startsWith("req_"), unary.requestId);
  });

  test("unary Respond returns the verified payload", async () => {
    const result = await client.respond("exact text through the pipeline", { model: "echo" });
    assert.equal(result.text, "exact text through the pipeline");
    assert.ok(result.verified);
    assert.equal(result.completed.verification?.status, pb.VerificationStatus.VERIFIED);
  });

  test("invalid arguments are a typed error naming every offending field", async () => {
    const error = await rejection(
      client.stream("x", { maxTokens: 10 ** 6, temperature: 7 }).collect(),
      InvalidArgument,
    );
    assert.equal(error.code, 3);
    assert.equal(error.domain, "tokenwire.dev");
    assert.ok(["MAX_TOKENS_TOO_LARGE", "INVALID_TEMPERATURE"].includes(error.reason), error.reason);
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field).sort(),
      ["params.max_tokens", "params.temperature"],
    );
    const unary = await rejection(client.respond("x", { maxTokens: 10 ** 6 }), InvalidArgument);
    assert.equal(unary.reason, "MAX_TOKENS_TOO_LARGE");
    assert.deepEqual(
      unary.fieldViolations.map((v) => v.field),
      ["params.max_tokens"],
    );
  });

  test("an unknown model is NOT_FOUND with the known models", async () => {
    const error = await rejection(client.respond("x", { model: "missing" }), NotFound);
    assert.equal(error.reason, "MODEL_NOT_FOUND");
    assert.ok(error.metadata["knownModels"]?.includes("echo"), JSON.stringify(error.metadata));
    await rejection(client.stream("x", { model: "missing" }).collect(), NotFound);
  });

  test("a mid-stream failure carries the last sequence and RetryInfo", async () => {
    const stream = client.stream("x", {
      mode: "stream",
      maxTokensPerChunk: 1,
      labels: { "tokenwire.sim/fail-after": "4", "tokenwire.sim/inter-token-ms": "1" },
    });
    const seen: number[] = [];
    const error = await rejection(
      (async () => {
        for await (const event of stream) if (event.type === "chunk") seen.push(event.sequence);
      })(),
      Unavailable,
    );
    assert.equal(error.reason, "BACKEND_FAILED");
    assert.equal(error.lastSequence, 4);
    assert.equal(stream.lastSequence, 4);
    assert.deepEqual(seen, [1, 2, 3, 4]);
    assert.equal(error.trailers["tokenwire-last-sequence"], "4");
    assert.ok(error.retryDelay !== undefined && error.retryDelay >= 1, String(error.retryDelay));
  });

  test("the client's deadline is enforced", async () => {
    const quick = new TokenwireClient(served.address, { timeoutMs: 200 });
    try {
      const started = Date.now();
      await rejection(
        quick.respond("x", { labels: { "tokenwire.sim/ttft-ms": "5000" } }),
        DeadlineExceeded,
      );
      assert.ok(Date.now() - started < 3000);
    } finally {
      quick.close();
    }
  });

  test("heartbeats during a long silence are events that change no text", async () => {
    const stream = client.stream("x", {
      mode: "stream",
      labels: { "tokenwire.sim/ttft-ms": "300", "tokenwire.sim/answer-tokens": "3" },
    });
    const events = await drain(stream);
    assert.ok(events.some((e) => e.type === "heartbeat"), "no heartbeat");
    assert.ok(stream.result!.verified);
  });

  test("leaving a stream early cancels it and leaves no deadline timer behind", async () => {
    const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
    const before = timers();
    const stream = client.stream("x", { mode: "stream", maxTokensPerChunk: 1, labels: SLOW });
    for await (const event of stream) {
      if (event.type === "chunk") break;
    }
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(stream.result, undefined);
    assert.equal(timers(), before);
  });

  test("a resumable stream resumes by sequence across a cut connection", async () => {
    const proxy = new CuttableProxy(served.address);
    const address = await proxy.start();
    const viaProxy = new TokenwireClient(address);
    try {
      const stream = viaProxy.stream("x", {
        mode: "stream",
        resumable: true,
        maxTokensPerChunk: 1,
        labels: SLOW,
      });
      const sequences: number[] = [];
      for await (const event of stream) {
        if (event.type === "chunk") {
          sequences.push(event.sequence);
          if (sequences.length === 5) proxy.cut();
        }
      }
      const result = stream.result!;
      assert.ok(result.verified);
      assert.ok(stream.resumes >= 1, `resumes ${stream.resumes}`);
      assert.ok(proxy.connections >= 2, `connections ${proxy.connections}`);
      assert.deepEqual(
        sequences,
        sequences.map((_, i) => i + 1),
      );
      assert.equal(sequences.length, result.completed.chunkCount);
      assert.equal(sequences.length, 60);
    } finally {
      viaProxy.close();
      await proxy.close();
    }
  });

  test("without resumable a cut connection is a typed error with the last sequence", async () => {
    const proxy = new CuttableProxy(served.address);
    const address = await proxy.start();
    const viaProxy = new TokenwireClient(address);
    try {
      const stream = viaProxy.stream("x", { mode: "stream", maxTokensPerChunk: 1, labels: SLOW });
      let received = 0;
      const error = await rejection(
        (async () => {
          for await (const event of stream) {
            if (event.type !== "chunk") continue;
            received = event.sequence;
            if (event.sequence === 3) proxy.cut();
          }
        })(),
        Unavailable,
      );
      assert.equal(error.domain, "");
      assert.equal(error.fromServer, false);
      // The last chunk the reader got: 3, or a later one already in flight when
      // the connection was cut (on a busy machine chunk 4 can be).
      assert.ok(received >= 3, `received ${received}`);
      assert.equal(error.lastSequence, received);
      assert.equal(stream.resumes, 0);
    } finally {
      viaProxy.close();
      await proxy.close();
    }
  });

  test("cancelResponse stops a running response and its reader ends CANCELLED", async () => {
    const stream = client.stream("x", {
      mode: "stream",
      resumable: true,
      maxTokensPerChunk: 1,
      labels: SLOW,
    });
    let cancelled: boolean | undefined;
    const error = await rejection(
      (async () => {
        for await (const event of stream) {
          if (event.type === "chunk" && event.sequence === 2) {
            cancelled = await client.cancelResponse(stream.responseId);
          }
        }
      })(),
      TokenwireError,
    );
    assert.equal(cancelled, true);
    assert.equal(error.code, 1);
    assert.equal(error.reason, "RESPONSE_CANCELLED");
    assert.equal(await client.cancelResponse(stream.responseId), false);
  });

  test("a response can be resumed by hand after a sequence", async () => {
    const first = await client.stream("resume me", { mode: "stream", maxTokensPerChunk: 4, resumable: true }).collect();
    assert.ok(first.chunkCount >= 3);
    const tail = await client.resumeStream(first.completed.responseId, 2).collect();
    assert.equal(tail.resumedAfter, 2);
    assert.equal(tail.sha256, first.sha256);
    assert.ok(first.text.endsWith(tail.text) && tail.text.length > 0);
  });
});

describe("with a blocking policy and one call slot", () => {
  let served: Served;
  let policy: { path: string; remove(): void };
  let client: TokenwireClient;

  before(async () => {
    policy = tempFile(
      "policy.yaml",
      [
        "id: ts-test",
        'version: "3"',
        'refusal_text: "Blocked by ts-test policy."',
        "block:",
        "  - id: codename",
        '    terms: ["project nightingale"]',
        "  - id: final-check",
        "    scope: final",
        "    pattern: '(?i)launch codes'",
        "",
      ].join("\n"),
    );
    served = await startServe(
      ...FAST_SIMULATOR,
      "--policy",
      policy.path,
      "--max-concurrent-calls",
      "1",
      // Slack for a just-finished call's slot; the quota test's rival waits this long.
      "--admission-wait",
      "0.5",
    );
    client = new TokenwireClient(served.address);
  });

  after(async () => {
    client?.close();
    await served?.stop();
    policy?.remove();
  });

  test("a whole-text block after streaming is an explicit retraction event", async () => {
    const stream = client.stream("Here are the launch codes you asked for, in full detail.", {
      model: "echo",
      mode: "stream",
      maxTokensPerChunk: 1,
      labels: { "tokenwire.sim/echo-token-chars": "3" },
    });
    const events = await drain(stream);
    const chunks = events.filter((e) => e.type === "chunk");
    const retractions = events.filter((e): e is RetractionEvent => e.type === "retraction");
    assert.ok(chunks.length > 1);
    assert.equal(retractions.length, 1);
    const retraction = retractions[0]!;
    assert.equal(events.at(-2), retraction);
    assert.equal(retraction.fromSequence, 1);
    assert.equal(retraction.fromOffset, 0);
    assert.equal(retraction.keptText, "");
    assert.equal(retraction.finalText, "Blocked by ts-test policy.");
    const result = stream.result!;
    assert.equal(result.retraction, retraction);
    assert.equal(result.text, "Blocked by ts-test policy.");
    assert.ok(result.verified);
    assert.equal(result.completed.verdict, pb.Verdict.BLOCKED);
    assert.equal(result.completed.verification?.status, pb.VerificationStatus.DIVERGED);
    assert.equal(result.completed.policyId, "ts-test");
    assert.equal(result.completed.policyVersion, "3");
  });

  test("a blocked term mid-stream retracts what was streamed", async () => {
    const text = "Safe opening words that stream out first. ".repeat(3) + "Then project nightingale leaks.";
    const stream = client.stream(text, {
      model: "echo",
      mode: "stream",
      maxTokensPerChunk: 1,
      labels: { "tokenwire.sim/echo-token-chars": "2" },
    });
    const events = await drain(stream);
    const streamed = events
      .filter((e): e is ChunkEvent => e.type === "chunk")
      .map((c) => c.text)
      .join("");
    assert.ok(streamed.length > 0 && !streamed.toLowerCase().includes("nightingale"));
    const retraction = stream.result!.retraction;
    assert.ok(retraction);
    assert.equal(retraction.fromSequence, 1);
    assert.equal(stream.result!.text, "Blocked by ts-test policy.");
  });

  test("a call over the server's limit is RESOURCE_EXHAUSTED with QuotaFailure", async () => {
    const stream = client.stream("x", {
      mode: "stream",
      maxTokensPerChunk: 1,
      labels: { "tokenwire.sim/inter-token-ms": "50" },
    });
    let error: ResourceExhausted | undefined;
    for await (const event of stream) {
      if (event.type === "chunk") {
        error = await rejection(client.respond("y"), ResourceExhausted);
        break; // cancels the stream, freeing the slot
      }
    }
    assert.ok(error);
    assert.equal(error.code, 8);
    assert.equal(error.reason, "SERVER_CONCURRENCY_EXCEEDED");
    assert.deepEqual(
      error.quotaViolations.map((v) => v.subject),
      ["server"],
    );
    assert.ok(error.retryDelay !== undefined && error.retryDelay > 0, String(error.retryDelay));
  });
});
