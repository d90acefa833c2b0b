/** The stream checks on their own: gaps, repeats, byte offsets, digests, retraction bounds. */

import assert from "node:assert/strict";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";

import { IntegrityError, ProtocolError, StreamAssembler, pb, sha256Hex } from "../src/index.js";

function chunk(sequence: number, text: string, textOffset: number): pb.StreamRespondResponse {
  return create(pb.StreamRespondResponseSchema, {
    event: { case: "chunk", value: { responseId: "r", sequence, text, textOffset } },
  });
}

function completed(fields: Partial<{ text: string; sha: string; last: number; diverged: number }>) {
  const text = fields.text ?? "";
  return create(pb.StreamRespondResponseSchema, {
    event: {
      case: "completed",
      value: {
        responseId: "r",
        finalText: text,
        finalSha256: fields.sha ?? sha256Hex(text),
        chunkCount: fields.last ?? 0,
        lastSequence: fields.last ?? 0,
        verification: {
          status: fields.diverged ? pb.VerificationStatus.DIVERGED : pb.VerificationStatus.VERIFIED,
          retractFromSequence: fields.diverged ?? 0,
        },
      },
    },
  });
}

test("a gap is a protocol error carrying the last sequence", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "ab", 0));
  assert.throws(
    () => assembler.feed(chunk(3, "cd", 2)),
    (error: unknown) => error instanceof ProtocolError && error.lastSequence === 1,
  );
});

test("a repeat is a protocol error", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "ab", 0));
  assert.throws(() => assembler.feed(chunk(1, "ab", 0)), ProtocolError);
});

test("offsets are UTF-8 bytes", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "é", 0));
  assert.throws(() => assembler.feed(chunk(2, "x", 1)), ProtocolError); // "é" is two bytes
  const ok = new StreamAssembler();
  ok.feed(chunk(1, "é🎉", 0));
  ok.feed(chunk(2, "x", 6));
  const events = ok.feed(completed({ text: "é🎉x", last: 2 }));
  assert.equal(events.at(-1)?.type, "completion");
  assert.equal(ok.result?.text, "é🎉x");
});

test("a digest mismatch is an integrity error", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "ab", 0));
  assert.throws(() => assembler.feed(completed({ sha: sha256Hex("other"), last: 1 })), IntegrityError);
});

test("Completed must name the last sequence received", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "ab", 0));
  assert.throws(() => assembler.feed(completed({ text: "ab", last: 2 })), ProtocolError);
});

test("nothing may follow Completed", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "ab", 0));
  assembler.feed(completed({ text: "ab", last: 1 }));
  assert.throws(() => assembler.feed(chunk(2, "c", 2)), ProtocolError);
});

test("a divergence keeps the chunks before the retraction point", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "Hello ", 0));
  assembler.feed(chunk(2, "secret", 6));
  const events = assembler.feed(completed({ text: "Hello [REDACTED]", last: 2, diverged: 2 }));
  assert.deepEqual(
    events.map((e) => e.type),
    ["retraction", "completion"],
  );
  const retraction = events[0];
  assert.ok(retraction?.type === "retraction");
  assert.equal(retraction.fromOffset, 6);
  assert.equal(retraction.keptText, "Hello ");
  assert.equal(assembler.result?.text, "Hello [REDACTED]");
});

test("a retraction whose kept chunks are not a prefix of the final text is an integrity error", () => {
  const assembler = new StreamAssembler();
  assembler.feed(chunk(1, "Hello ", 0));
  assembler.feed(chunk(2, "secret", 6));
  assert.throws(
    () => assembler.feed(completed({ text: "Bye [REDACTED]", last: 2, diverged: 2 })),
    IntegrityError,
  );
});
