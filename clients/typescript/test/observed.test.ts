/**
 * The client's counters: ordering violations and stalls, per client. A fake
 * RespondService (Connect-ES's own server over node:http2, speaking gRPC) plays
 * scripts no real tokenwire would send — a gap, a repeat, a wrong offset, an
 * event after Completed, a long silence; then the real server.
 */

import assert from "node:assert/strict";
import { once } from "node:events";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { create } from "@bufbuild/protobuf";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";

import {
  type Observation,
  type ObservationKind,
  type Observed,
  ProtocolError,
  TokenwireClient,
  Unimplemented,
  pb,
  sha256Hex,
} from "../src/index.js";
import { FAST_SIMULATOR, type Served, startServe } from "./helpers.js";

interface Step {
  pauseMs?: number;
  message?: pb.StreamRespondResponse;
}

function chunk(sequence: number, text: string, textOffset: number): Step {
  return {
    message: create(pb.StreamRespondResponseSchema, {
      event: { case: "chunk", value: { responseId: "r", sequence, text, textOffset } },
    }),
  };
}

function completed(text: string, last: number): Step {
  return {
    message: create(pb.StreamRespondResponseSchema, {
      event: {
        case: "completed",
        value: {
          responseId: "r",
          finalSha256: sha256Hex(text),
          chunkCount: last,
          lastSequence: last,
          verification: { status: pb.VerificationStatus.VERIFIED },
        },
      },
    }),
  };
}

/** Serves the script as StreamRespond on a loopback port (h2c, gRPC). */
async function startFake(...script: Step[]): Promise<{ address: string; close(): Promise<void> }> {
  const routes = (router: ConnectRouter) => {
    router.service(pb.RespondService, {
      async *streamRespond(_request, context) {
        for (const step of script) {
          if (step.pauseMs) await sleep(step.pauseMs, undefined, { signal: context.signal });
          if (step.message) yield step.message;
        }
      },
    });
  };
  const server = http2.createServer(connectNodeAdapter({ routes, grpc: true }));
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  return {
    address: `127.0.0.1:${port}`,
    close: async () => {
      for (const session of sessions) session.destroy();
      server.close();
      await once(server, "close");
    },
  };
}

/** A client that records what its hook hears; closed (with its fake) by `done`. */
function observingClient(address: string, stallTimeoutMs?: number) {
  const heard: Observation[] = [];
  const client = new TokenwireClient(address, {
    onObservation: (o) => heard.push(o),
    ...(stallTimeoutMs !== undefined ? { stallTimeoutMs } : {}),
  });
  return { client, heard };
}

/** Makes the connection before a test times a silence: the fake answers Respond UNIMPLEMENTED. */
async function connected(client: TokenwireClient): Promise<void> {
  await assert.rejects(client.respond("x"), Unimplemented);
}

function counts(observed: Observed): Record<string, number> {
  return observed.toJSON();
}

const NONE = {
  sequenceGaps: 0,
  sequenceRepeats: 0,
  offsetMismatches: 0,
  eventsAfterCompleted: 0,
  orderingViolations: 0,
  stalls: 0,
};

const VIOLATIONS: [string, Step[], ObservationKind, keyof typeof NONE][] = [
  ["a gap", [chunk(1, "ab", 0), chunk(3, "cd", 2)], "sequence_gap", "sequenceGaps"],
  [
    "a Completed naming chunks never received",
    [chunk(1, "ab", 0), completed("abcd", 2)],
    "sequence_gap",
    "sequenceGaps",
  ],
  ["a repeat", [chunk(1, "ab", 0), chunk(1, "ab", 0)], "sequence_repeat", "sequenceRepeats"],
  // "é" is two UTF-8 bytes, so chunk 2 starts at byte 2.
  ["a wrong offset", [chunk(1, "é", 0), chunk(2, "x", 1)], "offset_mismatch", "offsetMismatches"],
  [
    "an event after Completed",
    [chunk(1, "ab", 0), completed("ab", 1), chunk(2, "cd", 2)],
    "event_after_completed",
    "eventsAfterCompleted",
  ],
];

for (const [name, script, kind, counter] of VIOLATIONS) {
  test(`${name} is counted per client and still throws`, async () => {
    const fake = await startFake(...script);
    const { client, heard } = observingClient(fake.address);
    const other = new TokenwireClient(fake.address);
    try {
      for (let attempt = 0; attempt < 2; attempt++) {
        await assert.rejects(client.stream("x").collect(), ProtocolError);
      }
      assert.deepEqual(counts(client.observed), { ...NONE, [counter]: 2, orderingViolations: 2 });
      assert.equal(heard.length, 2);
      assert.equal(heard[0]?.kind, kind);
      assert.equal(heard[0]?.responseId, "r");
      assert.ok(heard[0]?.detail);
      await assert.rejects(other.stream("x").collect(), ProtocolError);
      assert.equal(other.observed.orderingViolations, 1);
      assert.equal(client.observed.orderingViolations, 2, "counts are per client");
    } finally {
      client.close();
      other.close();
      await fake.close();
    }
  });
}

test("a stall is counted once per silence and the stream goes on", async () => {
  const fake = await startFake(
    chunk(1, "ab", 0),
    { pauseMs: 1000, ...chunk(2, "cd", 2) }, // one silence of five timeouts
    { pauseMs: 50, ...completed("abcd", 2) },
  );
  const { client, heard } = observingClient(fake.address, 200);
  try {
    await connected(client);
    const result = await client.stream("x").collect();
    assert.equal(result.text, "abcd");
    assert.ok(result.verified);
    assert.deepEqual(counts(client.observed), { ...NONE, stalls: 1 });
    assert.equal(heard.length, 1);
    assert.equal(heard[0]?.kind, "stall");
    assert.equal(heard[0]?.lastSequence, 1);
    assert.equal(heard[0]?.responseId, "r");
  } finally {
    client.close();
    await fake.close();
  }
});

test("stallTimeoutMs 0 counts no stalls", async () => {
  const fake = await startFake({ pauseMs: 300, ...chunk(1, "ab", 0) }, completed("ab", 1));
  const { client } = observingClient(fake.address, 0);
  try {
    await client.stream("x").collect();
    assert.deepEqual(counts(client.observed), NONE);
  } finally {
    client.close();
    await fake.close();
  }
  assert.throws(() => new TokenwireClient(fake.address, { stallTimeoutMs: -1 }), RangeError);
});

test("a reader that pauses between events is not a stall", async () => {
  const fake = await startFake(chunk(1, "ab", 0), chunk(2, "cd", 2), completed("abcd", 2));
  const { client } = observingClient(fake.address, 200);
  try {
    await connected(client);
    for await (const event of client.stream("x")) {
      if (event.type === "chunk") await sleep(500); // busy caller, not a silent server
    }
    assert.equal(client.observed.stalls, 0);
  } finally {
    client.close();
    await fake.close();
  }
});

test("a hook that throws does not break the stream", async () => {
  const fake = await startFake(chunk(1, "ab", 0), chunk(3, "cd", 2));
  const client = new TokenwireClient(fake.address, {
    onObservation: () => {
      throw new Error("exporter down");
    },
  });
  const warnings: string[] = [];
  const onWarning = (warning: Error) => warnings.push(warning.message);
  process.on("warning", onWarning);
  try {
    await assert.rejects(client.stream("x").collect(), ProtocolError);
    assert.equal(client.observed.sequenceGaps, 1);
    await sleep(10);
    assert.ok(warnings.some((w) => w.includes("exporter down")), String(warnings));
  } finally {
    process.off("warning", onWarning);
    client.close();
    await fake.close();
  }
});

describe("against tokenwire serve", () => {
  let heartbeating: Served;
  let silent: Served;

  before(async () => {
    [heartbeating, silent] = await Promise.all([
      startServe(...FAST_SIMULATOR, "--heartbeat-interval", "0.1"),
      startServe(...FAST_SIMULATOR, "--heartbeat-interval", "5"),
    ]);
  });

  after(async () => {
    await Promise.all([heartbeating?.stop(), silent?.stop()]);
  });

  test("healthy streams and heartbeat-covered silences count nothing", async () => {
    const client = new TokenwireClient(heartbeating.address, { stallTimeoutMs: 1000 });
    try {
      await client.respond("x", { maxTokens: 4 }); // connected before silences are timed
      await client
        .stream("x", {
          mode: "stream",
          labels: { "tokenwire.sim/inter-token-ms": "10", "tokenwire.sim/answer-tokens": "60" },
        })
        .collect();
      // Silent for 2.5 timeouts, with a heartbeat every 0.1 s.
      await client
        .stream("x", { mode: "stream", maxTokens: 8, labels: { "tokenwire.sim/ttft-ms": "2500" } })
        .collect();
      assert.deepEqual(counts(client.observed), NONE);
    } finally {
      client.close();
    }
  });

  test("a server silent past the stall timeout counts one stall", async () => {
    const client = new TokenwireClient(silent.address, { stallTimeoutMs: 500 });
    try {
      const result = await client
        .stream("x", { mode: "stream", maxTokens: 8, labels: { "tokenwire.sim/ttft-ms": "2000" } })
        .collect();
      assert.ok(result.verified);
      assert.deepEqual(counts(client.observed), { ...NONE, stalls: 1 });
    } finally {
      client.close();
    }
  });
});
