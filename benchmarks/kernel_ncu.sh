#!/bin/bash
# Nsight Compute run of kernel_ncu.py on the GPU machine (Firecracker kind): report, details, raw metrics, SASS source into $OUT.
rm -rf /tmp/hs; python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/hs . > /dev/null 2>&1; export PYTHONPATH=/tmp/hs; cd benchmarks
nvidia-smi --query-gpu=name,clocks.sm --format=csv
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1); echo $NCU; $NCU --version | tail -1
$NCU --profile-from-start off --clock-control none --set full --import-source no --kernel-name regex:'_attn_fwd|_pair_mass' -o $OUT/prof python3 kernel_ncu.py --dims 64,128 --seqs 4096 2>&1 | grep -v "^==PROF==" | tail -20
$NCU -i $OUT/prof.ncu-rep --page details --print-units base > $OUT/details.txt 2>&1; wc -l $OUT/details.txt
$NCU -i $OUT/prof.ncu-rep --page raw --csv > $OUT/raw.csv 2>&1; wc -c $OUT/raw.csv
$NCU -i $OUT/prof.ncu-rep --page source --print-source sass --csv > $OUT/source.csv 2>&1; wc -c $OUT/source.csv
grep -E "^  [a-z_]+.*\(|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Active Warps Per|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall|Executed Ipc|Duration|Issued Warp Per" $OUT/details.txt | head -150
