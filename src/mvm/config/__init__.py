"""The state layout (`paths.Layout`), typed settings (`settings.Settings`) and the host context
every operation runs in (`host.Host`)."""
