# A later call: wait until N jobs are done or S seconds pass, then bring /root/res back as one tarball
# (JSONs that the benches rewrite as they go come back even when their jobs are still running).
#   bash /root/tree/bench/device/collect.sh N S      (no carry needed)
want=${1:-1}; end=$(( $(date +%s) + ${2:-300} ))
while [ "$(date +%s)" -lt "$end" ]; do
  n=$(ls /root/res/*.done 2>/dev/null | wc -l); [ "$n" -ge "$want" ] && break; sleep 5
done
ls -la /root/res; cat /root/res/*.done 2>/dev/null
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
tar czf "$OUT/res.tgz" --exclude='*.partial' -C /root/res .
for f in /root/res/*.log; do echo "== $f"; grep -v -i "warn" "$f" | tail -n 4; done
