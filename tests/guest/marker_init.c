/*
 * A minimal /init for boot tests of the Cube guest kernel.
 *
 * It proves the kernel reached user space: prints CUBE-GUEST-INIT-OK and the uptime on the
 * console, then asks the kernel to restart, which ends the VM. Restart rather than power-off:
 * without ACPI the kernel turns RB_POWER_OFF into a halt that no VMM notices (vmm-facts 9),
 * whereas a restart leaves through `reboot=k` (the i8042 reset our VMM turns into an exit) or
 * `reboot=t` (a triple fault; QEMU microvm has no i8042, and with -no-reboot QEMU exits on it).
 *
 * Built with `gcc -static -Os`; it needs nothing from the initramfs but /dev/console.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

static void say(int fd, const char *text)
{
	size_t len = strlen(text);
	while (len > 0) {
		ssize_t n = write(fd, text, len);
		if (n <= 0)
			return;
		text += n;
		len -= (size_t)n;
	}
}

/* The console the kernel gave us, else the UART through devtmpfs. */
static int open_console(void)
{
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (fd >= 0)
		return fd;
	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (fd >= 0)
		return fd;
	return open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
}

static void say_uptime(int fd)
{
	char buf[64];
	char line[96];
	int up;
	ssize_t n;

	mkdir("/proc", 0555);
	if (mount("proc", "/proc", "proc", 0, NULL) != 0)
		return;
	up = open("/proc/uptime", O_RDONLY);
	if (up < 0)
		return;
	n = read(up, buf, sizeof(buf) - 1);
	close(up);
	if (n <= 0)
		return;
	buf[n] = '\0';
	buf[strcspn(buf, " \n")] = '\0';
	snprintf(line, sizeof(line), "CUBE-GUEST-UPTIME %s\n", buf);
	say(fd, line);
}

int main(void)
{
	int fd = open_console();

	say(fd, "CUBE-GUEST-INIT-OK\n");
	say_uptime(fd);
	sync();
	reboot(RB_AUTOBOOT);
	/* Only reached if the reboot call itself failed; init must never exit. */
	for (;;)
		pause();
}
