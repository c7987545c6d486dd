// Validates an AsyncAPI document with the AsyncAPI project's parser (schema
// and semantic rules). Prints every diagnostic; exits 1 on any error.
// Usage: node validate.mjs <document.json>
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const path = process.argv[2];
const text = readFileSync(path, "utf8");
const { document, diagnostics } = await new Parser().parse(text);
const level = ["error", "warning", "info", "hint"];
for (const d of diagnostics) {
  console.log(`${level[d.severity]}: ${d.code}: ${d.message} at /${d.path.join("/")}`);
}
const errors = diagnostics.filter((d) => d.severity === 0).length;
if (!document || errors > 0) {
  console.log(`invalid: ${errors} errors`);
  process.exit(1);
}
console.log(`valid: AsyncAPI ${document.version()}, ${document.channels().length} channels, ${document.operations().length} operations, ${document.messages().length} messages`);
