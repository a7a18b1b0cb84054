"""The torch layer: offline datasets (:mod:`.datasets`), architectures (:mod:`.nets`), the
per-example gradient-norm tracker (:mod:`.grad_norms`), one DP-SGD update (:mod:`.dp_step`),
per-point evaluation (:mod:`.evaluation`) and input-loss curvature (:mod:`.curvature`).

Imports torch, opacus, numpy, scikit-learn and PIL only: no other dpledger package.
"""
