/**
 * `npm run example -- [options] "prompt"`: streams the answer to stdout and a
 * summary line (mode, chunks, verified SHA-256, retraction if any) to stderr.
 * The options are in USAGE: `npm run example -- --help` (without the `--`, npm
 * takes `--help` for itself and prints npm's help).
 */

import { type ParseArgsConfig, parseArgs } from "node:util";

import {
  type Mode,
  type Result,
  TokenwireClient,
  TokenwireError,
  pb,
  tlsFromFiles,
} from "../src/index.js";

const USAGE = `usage: npm run example -- [options] "prompt"

Streams the answer to stdout, then a summary line (mode, chunks, verified
SHA-256, timings, retraction, stalls) to stderr. Exit status: 0, 1 on a call
that failed, 2 on bad options.

options:
  --address HOST:PORT      server (default localhost:50051)
  --model NAME             model (default: the server's)
  --mode auto|stream|buffered
                           delivery mode (default auto)
  --unary                  call unary Respond instead
  --tls                    TLS with the system roots
  --tls-ca FILE            trust this CA (TLS)
  --tls-cert FILE          client certificate (mTLS, with --tls-key)
  --tls-key FILE           client key (mTLS, with --tls-cert)
  --api-key KEY            send authorization: Bearer KEY (or TOKENWIRE_API_KEY)
  --max-tokens N           0: the server's default
  --timeout SECONDS        the call's deadline (default 60)
  --stall-timeout SECONDS  count a stall after this long without an event (default 30; 0 off)
  --label KEY=VALUE        a request label (repeatable)
  --no-resume              do not resume a dropped stream
  -h, --help               show this help
`;

const OPTIONS = {
  help: { type: "boolean", short: "h", default: false },
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
  "stall-timeout": { type: "string", default: "30" },
  label: { type: "string", multiple: true, default: [] as string[] },
  "no-resume": { type: "boolean", default: false },
} satisfies ParseArgsConfig["options"];

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

/** Bad usage: the problem, then how to call; exit status 2. */
function usageError(problem: string): number {
  process.stderr.write(`${problem}\n\n${USAGE}`);
  return 2;
}

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, allowPositionals: true, options: OPTIONS });
  } catch (error) {
    // node:util's parseArgs is strict: an undeclared option (--help was one)
    // or a missing value throws. Say so and how to call, not a stack trace.
    return usageError((error as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const prompt = positionals.join(" ");
  if (!prompt) return usageError("no prompt given");
  if (!["auto", "stream", "buffered"].includes(values.mode)) {
    return usageError(`unknown --mode ${values.mode}`);
  }
  const numbers = {
    "max-tokens": Number(values["max-tokens"]),
    timeout: Number(values.timeout),
    "stall-timeout": Number(values["stall-timeout"]),
  };
  for (const [name, value] of Object.entries(numbers)) {
    if (!Number.isFinite(value) || value < 0) return usageError(`--${name} must be a number >= 0`);
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
    timeoutMs: numbers.timeout * 1000,
    stallTimeoutMs: numbers["stall-timeout"] * 1000,
    ...(apiKey ? { apiKey } : {}),
  });
  const options = { model: values.model, maxTokens: numbers["max-tokens"], labels };
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
    const { stalls } = client.observed;
    process.stdout.write("\n");
    process.stderr.write(
      summary(result, mode) +
        (stream.resumes ? ` · resumed ${stream.resumes}×` : "") +
        (stalls ? ` · ${stalls} stall${stalls > 1 ? "s" : ""}` : "") +
        "\n",
    );
    return 0;
  } catch (error) {
    if (error instanceof TokenwireError) {
      process.stderr.write(`\nerror: ${error.message}\n`);
      for (const v of error.fieldViolations) process.stderr.write(`  ${v.field}: ${v.description}\n`);
      if (error.lastSequence) process.stderr.write(`  last sequence: ${error.lastSequence}\n`);
      const seen = client.observed;
      if (seen.orderingViolations || seen.stalls) {
        process.stderr.write(`  observed: ${JSON.stringify(seen)}\n`);
      }
      return 1;
    }
    throw error;
  } finally {
    client.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
