/**
 * `npm run example -- [options] "prompt"`: streams the answer to stdout and a
 * summary line (mode, chunks, verified SHA-256, retraction if any) to stderr.
 *
 *   --address HOST:PORT     server (default localhost:50051)
 *   --model NAME            model (default: the server's)
 *   --mode auto|stream|buffered
 *   --unary                 call unary Respond instead
 *   --tls                   TLS with the system roots
 *   --tls-ca FILE --tls-cert FILE --tls-key FILE   TLS / mTLS from PEM files
 *   --api-key KEY           authorization: Bearer KEY (or TOKENWIRE_API_KEY)
 *   --max-tokens N  --timeout SECONDS  --label KEY=VALUE (repeatable)
 *   --no-resume             do not resume a dropped stream
 */

import { parseArgs } from "node:util";

import {
  type Mode,
  type Result,
  TokenwireClient,
  TokenwireError,
  pb,
  tlsFromFiles,
} from "../src/index.js";

function summary(result: Result, mode: string): string {
  const c = result.completed;
  const sha = `${result.sha256.slice(0, 12)}… ${result.verified ? "verified" : "NOT VERIFIED"}`;
  const parts = [
    mode,
    `${result.chunkCount} chunks`,
    `sha256 ${sha}`,
    `ttft ${(result.timeToFirstToken * 1000).toFixed(1)} ms`,
    `total ${(result.totalTime * 1000).toFixed(1)} ms`,
    `${c.usage?.completionTokens ?? 0} tokens`,
  ];
  if (result.retraction) {
    parts.push(`retracted from chunk ${result.retraction.fromSequence}`);
  }
  return `[${parts.join(" · ")}]`;
}

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      address: { type: "string", default: "localhost:50051" },
      model: { type: "string", default: "" },
      mode: { type: "string", default: "auto" },
      unary: { type: "boolean", default: false },
      tls: { type: "boolean", default: false },
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "api-key": { type: "string" },
      "max-tokens": { type: "string", default: "0" },
      timeout: { type: "string", default: "60" },
      label: { type: "string", multiple: true, default: [] },
      "no-resume": { type: "boolean", default: false },
    },
  });
  const prompt = positionals.join(" ");
  if (!prompt) {
    process.stderr.write('usage: npm run example -- [options] "prompt"\n');
    return 2;
  }
  if (!["auto", "stream", "buffered"].includes(values.mode)) {
    process.stderr.write(`unknown --mode ${values.mode}\n`);
    return 2;
  }
  const useFiles = Boolean(values["tls-ca"] || values["tls-cert"] || values["tls-key"]);
  const tls = useFiles
    ? tlsFromFiles(values["tls-ca"], values["tls-cert"], values["tls-key"])
    : values.tls;
  const apiKey = values["api-key"] ?? process.env["TOKENWIRE_API_KEY"];
  const labels = Object.fromEntries(
    values.label.map((pair) => {
      const at = pair.indexOf("=");
      return at < 0 ? [pair, ""] : [pair.slice(0, at), pair.slice(at + 1)];
    }),
  );
  const client = new TokenwireClient(values.address, {
    tls,
    timeoutMs: Number(values.timeout) * 1000,
    ...(apiKey ? { apiKey } : {}),
  });
  const options = { model: values.model, maxTokens: Number(values["max-tokens"]), labels };
  try {
    if (values.unary) {
      const result = await client.respond(prompt, options);
      process.stdout.write(`${result.text}\n`);
      process.stderr.write(`${summary(result, "unary")}\n`);
      return 0;
    }
    const stream = client.stream(prompt, {
      ...options,
      mode: values.mode as Mode,
      resumable: !values["no-resume"],
    });
    const interrupt = () => {
      const id = stream.responseId;
      stream.cancel();
      if (id) void client.cancelResponse(id, { timeoutMs: 2000 }).catch(() => undefined);
    };
    process.once("SIGINT", interrupt);
    for await (const event of stream) {
      if (event.type === "chunk") {
        process.stdout.write(event.text);
      } else if (event.type === "retraction") {
        process.stdout.write(
          `\n[retracted from chunk ${event.fromSequence}; final text follows]\n${event.finalText}`,
        );
      }
    }
    process.off("SIGINT", interrupt);
    const result = stream.result!;
    const mode = result.completed.deliveryMode === pb.DeliveryMode.BUFFERED ? "buffered" : "stream";
    process.stdout.write("\n");
    process.stderr.write(
      `${summary(result, mode)}${stream.resumes ? ` · resumed ${stream.resumes}×` : ""}\n`,
    );
    return 0;
  } catch (error) {
    if (error instanceof TokenwireError) {
      process.stderr.write(`\nerror: ${error.message}\n`);
      for (const v of error.fieldViolations) process.stderr.write(`  ${v.field}: ${v.description}\n`);
      if (error.lastSequence) process.stderr.write(`  last sequence: ${error.lastSequence}\n`);
      return 1;
    }
    throw error;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
