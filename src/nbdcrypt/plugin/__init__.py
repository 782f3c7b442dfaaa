"""Only what runs inside nbdkit's embedded Python: the plugin callbacks
(:mod:`.nbdkit_plugin`), one export's parameters and key handover (:mod:`.export`),
the control socket (:mod:`.control_server`) and the Prometheus metrics (:mod:`.metrics`).
It builds on :mod:`nbdcrypt.formats` and :mod:`nbdcrypt.datapath` and never imports
:mod:`nbdcrypt.daemon`.
"""
