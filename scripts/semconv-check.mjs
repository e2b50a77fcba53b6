// Checks what mqtrace emitted against the semantic-conventions registry, as the
// npm package @opentelemetry/semantic-conventions publishes it (generated from the
// registry of the same version), independently of mqtrace's own name tables.
//
//   node scripts/semconv-check.mjs CAPTURE.jsonl [SPAN_MODEL.md]
//
// CAPTURE.jsonl: one JSON object per line, {"kind": "span"|"metric", "name": ...,
// "attributes": {key: {"type": "string"|"int"|"double"|"bool", "value": ...}}}.
// MQTRACE_TEST_SEMCONV: the package's directory (scripts/brokers.sh installs it).
//
// For every attribute outside mqtrace's namespace: the registry has it, it is not
// deprecated, its type is the registry's (where the registry's example tells the
// type), its value is not one the registry deprecates, and for the enums below
// it is one of the registry's. Metric names
// are the registry's and not deprecated. Names in mqtrace's namespace (and
// captured `messaging.header.*`) must be documented in docs/span-model.md.
// Exit status 1 with the findings, 0 when there are none.

import { readFileSync } from "node:fs";
import { join } from "node:path";

const dir = process.env.MQTRACE_TEST_SEMCONV;
if (!dir) {
  console.error("MQTRACE_TEST_SEMCONV is not set: run scripts/brokers.sh start and source .mqtrace-test/env");
  process.exit(2);
}
const [capturePath, docsPath = "docs/span-model.md"] = process.argv.slice(2);
if (!capturePath) {
  console.error("usage: node scripts/semconv-check.mjs CAPTURE.jsonl [SPAN_MODEL.md]");
  process.exit(2);
}

const version = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")).version;

// Every `/** doc */ declare const NAME: "value";` of the package's declarations.
function declarations(file) {
  const text = readFileSync(join(dir, "dist", file), "utf8");
  const out = [];
  const re = /\/\*\*([\s\S]*?)\*\/\s*declare const (\w+): "([^"]*)";/g;
  for (let m; (m = re.exec(text)); ) out.push({ doc: m[1], constant: m[2], value: m[3] });
  return out;
}

function exampleType(doc) {
  const m = /@example\s+(\S.*)/.exec(doc);
  if (!m) return null;
  const example = m[1].trim();
  if (example.startsWith('"')) return "string";
  if (/^-?\d+$/.test(example)) return "int";
  if (/^-?\d*\.\d+$/.test(example)) return "double";
  if (example === "true" || example === "false") return "bool";
  return null;
}

const attributes = new Map(); // name -> {deprecated, type}
const constants = new Map(); // ATTR_ constant -> name
const enums = new Map(); // name -> Map of value -> deprecated
const metrics = new Map(); // name -> {deprecated}
for (const file of ["stable_attributes.d.mts", "experimental_attributes.d.mts"]) {
  const decls = declarations(file);
  for (const d of decls) {
    if (d.constant.startsWith("ATTR_")) {
      attributes.set(d.value, { deprecated: /@deprecated/.test(d.doc), type: exampleType(d.doc) });
      constants.set(d.constant, d.value);
    }
  }
  for (const d of decls) {
    const owner = /Enum value "[^"]*" for attribute \{@link (ATTR_\w+)\}/.exec(d.doc);
    if (owner && constants.has(owner[1])) {
      const name = constants.get(owner[1]);
      if (!enums.has(name)) enums.set(name, new Map());
      enums.get(name).set(d.value, /@deprecated/.test(d.doc));
    }
  }
}
for (const file of ["stable_metrics.d.mts", "experimental_metrics.d.mts"]) {
  for (const d of declarations(file)) {
    if (d.constant.startsWith("METRIC_")) metrics.set(d.value, { deprecated: /@deprecated/.test(d.doc) });
  }
}
if (attributes.size < 500 || metrics.size < 50) {
  console.error(`the registry in ${dir} looks incomplete: ${attributes.size} attributes, ${metrics.size} metrics`);
  process.exit(2);
}

// Enums whose values are checked; the others (error.type, say) are open by design.
const CHECKED_ENUMS = ["messaging.operation.type", "messaging.system.name", "faas.trigger"];
// Values of ours the registry does not list: the embedded broker's system.
const OWN_VALUES = { "messaging.system.name": ["mqtrace"] };

const docs = readFileSync(docsPath, "utf8");
const documented = new Set([...docs.matchAll(/`((?:mqtrace|messaging\.header)\.[a-z0-9_.<>-]+)`/g)].map((m) => m[1]));
const isDocumented = (name) =>
  documented.has(name) || (name.startsWith("messaging.header.") && documented.has("messaging.header.<name>"));
const ours = (name) => name.startsWith("mqtrace.") || name.startsWith("messaging.header.");

const findings = new Set();
let spans = 0;
let streams = 0;
const seen = new Set();
const lines = readFileSync(capturePath, "utf8").split("\n").filter((l) => l.trim());
for (const line of lines) {
  const item = JSON.parse(line);
  if (item.kind === "span") spans++;
  else {
    streams++;
    if (ours(item.name)) {
      if (!isDocumented(item.name)) findings.add(`metric ${item.name}: in mqtrace's namespace but not in ${docsPath}`);
    } else if (!metrics.has(item.name)) findings.add(`metric ${item.name}: not in the registry`);
    else if (metrics.get(item.name).deprecated) findings.add(`metric ${item.name}: deprecated in the registry`);
  }
  for (const [key, { type, value }] of Object.entries(item.attributes)) {
    seen.add(key);
    const where = `${item.kind} "${item.name}": ${key}`;
    if (ours(key)) {
      if (!isDocumented(key)) findings.add(`${where}: in mqtrace's namespace but not in ${docsPath}`);
      continue;
    }
    const known = attributes.get(key);
    if (!known) {
      findings.add(`${where}: not in the registry`);
      continue;
    }
    if (known.deprecated) findings.add(`${where}: deprecated in the registry`);
    if (known.type && known.type !== type) findings.add(`${where}: ${type}, the registry says ${known.type}`);
    const values = enums.get(key);
    if (values?.get(value)) findings.add(`${where}: value ${JSON.stringify(value)} is deprecated in the registry`);
    if (CHECKED_ENUMS.includes(key) && values) {
      const allowed = [...values].filter(([, deprecated]) => !deprecated).map(([v]) => v);
      allowed.push(...(OWN_VALUES[key] ?? []));
      if (!values.has(value) && !allowed.includes(value))
        findings.add(`${where}: value ${JSON.stringify(value)} is not one of ${allowed.join(", ")}`);
    }
  }
}

if (findings.size > 0) {
  console.log(`semantic conventions ${version}: ${findings.size} findings in ${spans} spans and ${streams} metric streams`);
  for (const f of [...findings].sort()) console.log(`  ${f}`);
  process.exit(1);
}
console.log(
  `semantic conventions ${version}: ${spans} spans and ${streams} metric streams, ${seen.size} distinct attributes: ok`
);
