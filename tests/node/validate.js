#!/usr/bin/env node
// Independent FHIR R4 validation of JSON resources with the npm package `fhir` (4.x).
// Usage: node validate.js FILE...   or   ... | node validate.js   (stdin: one resource or
// a JSON array of resources). Prints one line per validation message and exits 1 when any
// resource is invalid, 2 when input cannot be read.
'use strict';
const fs = require('fs');
const { Fhir } = require('fhir');

function inputs() {
  const files = process.argv.slice(2);
  if (files.length === 0) return [['stdin', fs.readFileSync(0, 'utf8')]];
  return files.map((f) => [f, fs.readFileSync(f, 'utf8')]);
}

const fhir = new Fhir();
let invalid = 0;
let count = 0;
try {
  for (const [source, text] of inputs()) {
    const parsed = JSON.parse(text);
    const resources = Array.isArray(parsed) ? parsed : [parsed];
    resources.forEach((resource, i) => {
      count += 1;
      const name = resources.length > 1 ? `${source}[${i}]` : source;
      const result = fhir.validate(resource, { errorOnUnexpected: true });
      for (const m of result.messages || []) {
        console.log(`${name}: ${m.severity} ${m.location || ''}: ${m.message}`);
      }
      if (!result.valid) invalid += 1;
    });
  }
} catch (e) {
  console.error(`cannot read input: ${e.message}`);
  process.exit(2);
}
console.log(`${count - invalid} valid, ${invalid} invalid`);
process.exit(invalid > 0 ? 1 : 0);
