"""The builder microVM, named by the side each part runs on: `on_host` (its disks, the cache
key, reading back its output), `in_guest` (the build job inside the VM; standard library and
the mvm modules shipped with it only) and `vm_image` (the VM's Debian image). The service that
boots it is `mvm.services.builder`."""
