import gzip, json, sys, glob, collections, re
d = sys.argv[1]; steps = 16
f = glob.glob(d + "/trace/**/*.trace.json.gz", recursive=True)[0]
ev = [e for e in json.load(gzip.open(f))["traceEvents"] if e.get("ph") == "X" and "hlo_op" in e.get("args", {}) and e["args"].get("hlo_module", "jit__decode") == "jit__decode"]
agg = collections.Counter(); cnt = collections.Counter()
for e in ev:
    k = re.sub(r"\.\d+$", "", e["name"])
    agg[k] += e["dur"]; cnt[k] += 1
tot = sum(agg.values())
print(d, f"total {tot/1e3/steps:.2f} ms/step, {sum(cnt.values())/steps:.0f} ops/step")
for k, v in agg.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 25):
    print(f"{v/1e3/steps:7.3f} ms/step {cnt[k]/steps:6.0f} ops/step  {k}")
