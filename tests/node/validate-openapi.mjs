// Validates OpenAPI documents against the OpenAPI specification's schema (3.0 or 3.1, from the
// document's `openapi` field). Prints one JSON object: each path given -> null when valid, else
// the validator's errors.
import { Validator } from "@seriousme/openapi-schema-validator";

const validator = new Validator(); // compiling the specification schema is the slow part: once
const results = {};
for (const path of process.argv.slice(2)) {
  const result = await validator.validate(path);
  results[path] = result.valid ? null : result.errors;
}
console.log(JSON.stringify(results));
