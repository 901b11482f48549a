"""``sgl_kernel.kvcacheio``: host/device KV transfers of SGLang's hierarchical cache (HiCache), imported by its
host memory pools; ``--kv-compression`` refuses HiCache, and a plain server does not enable it."""

from ._stub import unsupported

_NAMES = """
    transfer_kv_all_layer transfer_kv_all_layer_direct_lf_pf transfer_kv_all_layer_lf_pf
    transfer_kv_all_layer_lf_ph transfer_kv_all_layer_mla transfer_kv_all_layer_mla_lf_pf transfer_kv_direct
    transfer_kv_per_layer transfer_kv_per_layer_direct_pf_lf transfer_kv_per_layer_mla
    transfer_kv_per_layer_mla_pf_lf transfer_kv_per_layer_pf_lf transfer_kv_per_layer_ph_lf
""".split()
globals().update({n: unsupported(f"sgl_kernel.kvcacheio.{n}", "HiCache") for n in _NAMES})
