// SPDX-License-Identifier: GPL-2.0
/*
 * mvm_mmio_cmdline: virtio-mmio devices named on the kernel command line, for kernels
 * built without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's cloud kernel, mvm's default).
 *
 * Firecracker without ACPI (and QEMU's microvm with acpi=off) announce their virtio-mmio
 * devices only as `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` on the command line.
 * mvm's initrd passes each such entry here as `device=<size>@<base>:<irq>[:<id>]`, and this
 * module registers a "virtio-mmio" platform device for it, as vm_cmdline_set() in
 * drivers/virtio/virtio_mmio.c does; the virtio_mmio driver then binds to them.
 * Built by mvm (mvm.build.kernel) against the headers of the kernel it ships.
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/platform_device.h>

#define MAX_DEVICES 32

static struct platform_device *devices[MAX_DEVICES];
static int count;
static int next_id;

static int device_set(const char *val, const struct kernel_param *kp)
{
	struct resource res[2] = {};
	struct platform_device *pdev;
	long long base, size;
	unsigned int irq;
	int processed, consumed = 0;
	char *str;

	if (count >= MAX_DEVICES)
		return -ENOSPC;
	/* "<size>@<base>:<irq>[:<id>]", exactly as virtio_mmio.device= */
	size = memparse(val, &str);
	processed = sscanf(str, "@%lli:%u%n:%d%n", &base, &irq, &consumed, &next_id, &consumed);
	if (processed < 2 || str[consumed] || irq == 0 || size <= 0)
		return -EINVAL;

	res[0].flags = IORESOURCE_MEM;
	res[0].start = base;
	res[0].end = base + size - 1;
	res[1].flags = IORESOURCE_IRQ;
	res[1].start = res[1].end = irq;

	pr_info("mvm_mmio_cmdline: registering virtio-mmio.%d at 0x%llx-0x%llx, IRQ %u\n",
		next_id, (unsigned long long)res[0].start, (unsigned long long)res[0].end, irq);
	pdev = platform_device_register_resndata(NULL, "virtio-mmio", next_id++, res,
						 ARRAY_SIZE(res), NULL, 0);
	if (IS_ERR(pdev))
		return PTR_ERR(pdev);
	devices[count++] = pdev;
	return 0;
}

static const struct kernel_param_ops device_ops = { .set = device_set };
module_param_cb(device, &device_ops, NULL, 0);
MODULE_PARM_DESC(device, "a virtio-mmio device: <size>@<base>:<irq>[:<id>] (repeatable)");

static int __init mvm_mmio_cmdline_init(void)
{
	return 0;
}

static void __exit mvm_mmio_cmdline_exit(void)
{
	while (count > 0)
		platform_device_unregister(devices[--count]);
}

module_init(mvm_mmio_cmdline_init);
module_exit(mvm_mmio_cmdline_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("virtio-mmio devices from virtio_mmio.device= entries, for mvm's initrd");
