// Validates KEDA objects (a JSON array on stdin) with @kubernetes-models/keda, the models generated
// from KEDA's CRDs (their OpenAPI schemas). Prints one JSON line: [{kind, name, error|null}, ...].
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const results = JSON.parse(input).map((obj) => {
    const Model = keda[obj.kind];
    const name = (obj.metadata || {}).name;
    if (obj.apiVersion !== "keda.sh/v1alpha1" || !Model) {
      return { kind: obj.kind, name, error: `not a KEDA keda.sh/v1alpha1 kind: ${obj.apiVersion} ${obj.kind}` };
    }
    try {
      new Model(obj).validate();
      return { kind: obj.kind, name, error: null };
    } catch (e) {
      return { kind: obj.kind, name, error: String(e.message || e) };
    }
  });
  process.stdout.write(JSON.stringify(results) + "\n");
});
