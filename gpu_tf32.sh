#!/bin/bash
# One device call: the paper-size training step with TF32 matrix products allowed (float32 ones outside autocast).
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f $__EGL_VENDOR_LIBRARY_FILENAMES ] || unset __EGL_VENDOR_LIBRARY_FILENAMES
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -e leworld/configs ] || ln -s ../configs leworld/configs
export PYTHONPATH=$PWD:/tmp/site MUJOCO_GL=egl PYTHONUNBUFFERED=1
for precision in highest high; do
  timeout 200 python3 -c "
import sys, runpy, torch
torch.set_float32_matmul_precision('$precision')
sys.argv = ['bench', 'train', 'train.models=[lewm]', 'train.scale=gpu', 'train.compile=[false,true]']
runpy.run_module('leworld.bench', run_name='__main__')
" > $OUT/tf32-$precision.txt 2>&1
  echo "rc=$?" >> $OUT/tf32-$precision.txt
done
grep "^| lewm\|rc=" $OUT/*.txt
