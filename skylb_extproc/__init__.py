"""SkyLB for Envoy ext_proc."""
