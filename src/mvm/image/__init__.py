"""A pool's image: the build recipe (`pipeline`), the flake's source, Nix, the rootfs packer,
the revision and its directory, what a build produced (`outputs`, `archive`), the default
guest kernel and the offline package set. The builder microVM (`mvm.builder`) runs part of
this code inside the guest: those modules use the standard library only."""
