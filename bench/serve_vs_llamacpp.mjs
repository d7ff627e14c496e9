// llama.cpp's side of bench/serve_vs_llamacpp.py, through node-llama-cpp (its prebuilt CPU binaries).
//
//   node serve_vs_llamacpp.mjs NODE_MODULES_DIR MODEL.gguf JOB.json
//
// JOB.json: {"threads": T, "runs": [{"kind": "streams", "streams": N, "tokens": K, "prompt": [ids...]},
//                                     {"kind": "ttft", "prompt": [ids...]}, ...]}
// Every run is greedy (temperature 0) and never stops early (EOS ignored: the tokens are yielded as they come).
// TTFT: the ~500-token prompt goes to llama.cpp in one batch (node-llama-cpp's default batch is
// min(contextSize x sequences, 512) tokens); checked against evaluateWithoutGeneratingNewTokens, which takes as long.
// Prints one JSON line: {"results": [{"wall_s": ..., "first_s": ..., "tokens": ...}, ...], "version": ...}.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modulesDir, modelPath, jobPath] = process.argv.slice(2);
const pkg = join(modulesDir, "node-llama-cpp");
const { getLlama } = await import(pathToFileURL(join(pkg, "dist", "index.js")).href);
const version = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8")).version;
const job = JSON.parse(readFileSync(jobPath, "utf8"));

const llama = await getLlama({ gpu: false, build: "never", maxThreads: job.threads, logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const contexts = new Map(); // streams -> context with that many sequences

async function contextFor(streams) {
  if (!contexts.has(streams)) {
    contexts.set(streams, await model.createContext({
      sequences: streams, contextSize: 1024, threads: { ideal: job.threads, min: job.threads },
    }));
  }
  return contexts.get(streams);
}

// One sequence: evaluate the prompt, take `tokens` greedy tokens; the times of the first and the last.
async function stream(sequence, prompt, tokens, started) {
  let n = 0;
  let first = 0;
  for await (const _token of sequence.evaluate(prompt, { temperature: 0 })) {
    n += 1;
    if (n === 1) first = performance.now() - started;
    if (n >= tokens) break;
  }
  return { first, n };
}

async function run(spec) {
  const streams = spec.kind === "ttft" ? 1 : spec.streams;
  const tokens = spec.kind === "ttft" ? 1 : spec.tokens;
  const context = await contextFor(streams);
  const sequences = Array.from({ length: streams }, () => context.getSequence());
  const started = performance.now();
  const done = await Promise.all(sequences.map((s) => stream(s, spec.prompt, tokens, started)));
  const wall = performance.now() - started;
  for (const s of sequences) s.dispose();
  return {
    wall_s: wall / 1000,
    first_s: Math.max(...done.map((d) => d.first)) / 1000,
    tokens: done.reduce((a, d) => a + d.n, 0),
  };
}

const results = [];
for (const spec of job.runs) results.push(await run(spec));
process.stdout.write(JSON.stringify({ results, version }) + "\n");
for (const c of contexts.values()) await c.dispose();
await model.dispose();
