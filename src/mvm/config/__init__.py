"""The state layout (`paths.Layout`) and typed settings (`settings.Settings`); the host context
that carries them is a layer above (`mvm.context`)."""
