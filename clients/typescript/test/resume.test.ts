/**
 * Which endings a resumable stream resumes after: a dropped connection, or a
 * replica that stopped while the response (shared through Redis) went on.
 * Any other status from tokenwire is the response's own end.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { ProtocolError, StatusCode, TokenwireError, worthResuming } from "../src/index.js";

const DOMAIN = "tokenwire.dev";

test("a stopping replica is resumed elsewhere, like a dropped connection", () => {
  assert.equal(worthResuming(new TokenwireError("reset", { code: StatusCode.UNAVAILABLE })), true);
  const stopping = new TokenwireError("this replica is stopping", {
    code: StatusCode.UNAVAILABLE,
    reason: "SERVER_STOPPING",
    domain: DOMAIN,
    fromServer: true,
  });
  assert.equal(worthResuming(stopping), true);
});

test("no other tokenwire status is resumed", () => {
  for (const [code, reason] of [
    [StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"],
    [StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"],
    [StatusCode.CANCELLED, "SERVER_STOPPING"],
    [StatusCode.CANCELLED, "RESPONSE_CANCELLED"],
  ] as const) {
    const error = new TokenwireError("ended", { code, reason, domain: DOMAIN, fromServer: true });
    assert.equal(worthResuming(error), false, `${code} ${reason}`);
  }
  assert.equal(worthResuming(new ProtocolError("gap", { code: StatusCode.UNAVAILABLE })), false);
});
