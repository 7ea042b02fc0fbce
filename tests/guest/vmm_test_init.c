/*
 * /init for the VMM's lab tests: exercises the devices a sandbox depends on from inside a real
 * Linux guest, and answers the host over vsock.
 *
 * On boot it checks the disk (/dev/vda: reads sector 0, writes and reads back a block) and
 * prints the result, says hello to the host (vsock CID 2, port 1235), then serves one command
 * per line on vsock port 1234, one connection at a time:
 *   ping          -> "pong N" (N counts pings since boot, so clones show their own history)
 *   set VALUE     -> "ok"     (kept in memory: clones of one snapshot must not share it)
 *   get           -> VALUE
 *   poweroff      -> "bye", then restart, which our VMM turns into a stop (reboot=k)
 * The listening socket survives a snapshot's vsock transport reset, so clones answer too.
 *
 * Built with `gcc -static -Os`.
 */
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define COMMAND_PORT 1234
#define HELLO_PORT 1235
#define BLOCK 4096

static int console = 2;

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

static void check_disk(void)
{
	unsigned char buf[BLOCK];
	char line[128];
	const char *pattern = "cube-blk-written";
	int fd = open("/dev/vda", O_RDWR);

	if (fd < 0) {
		say(console, "CUBE-BLK-NONE\n");
		return;
	}
	if (pread(fd, buf, 16, 0) != 16) {
		say(console, "CUBE-BLK-FAIL read\n");
		close(fd);
		return;
	}
	snprintf(line, sizeof(line), "CUBE-BLK-READ %.16s\n", (char *)buf);
	say(console, line);
	memset(buf, 0, sizeof(buf));
	strcpy((char *)buf, pattern);
	if (pwrite(fd, buf, BLOCK, BLOCK) != BLOCK || fsync(fd) != 0) {
		say(console, "CUBE-BLK-FAIL write\n");
		close(fd);
		return;
	}
	memset(buf, 0, sizeof(buf));
	/* Drop the page cache's copy so the read goes to the device. */
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	if (pread(fd, buf, BLOCK, BLOCK) != BLOCK || strcmp((char *)buf, pattern) != 0) {
		say(console, "CUBE-BLK-FAIL readback\n");
		close(fd);
		return;
	}
	close(fd);
	say(console, "CUBE-BLK-OK\n");
}

static void say_hello(void)
{
	struct sockaddr_vm host = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = HELLO_PORT};
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0)
		return;
	if (connect(fd, (struct sockaddr *)&host, sizeof(host)) == 0)
		say(fd, "hello-from-guest\n");
	close(fd);
}

static int read_line(int fd, char *line, size_t size)
{
	size_t used = 0;
	while (used + 1 < size) {
		ssize_t n = read(fd, line + used, 1);
		if (n <= 0)
			return -1;
		if (line[used] == '\n')
			break;
		used++;
	}
	line[used] = '\0';
	return (int)used;
}

static void serve(int listener)
{
	static char value[256] = "";
	static unsigned long pings;
	char line[256];
	char reply[300];

	for (;;) {
		int conn = accept(listener, NULL, NULL);
		if (conn < 0)
			continue;
		while (read_line(conn, line, sizeof(line)) >= 0) {
			if (strcmp(line, "ping") == 0) {
				snprintf(reply, sizeof(reply), "pong %lu\n", ++pings);
			} else if (strncmp(line, "set ", 4) == 0) {
				snprintf(value, sizeof(value), "%s", line + 4);
				snprintf(reply, sizeof(reply), "ok\n");
			} else if (strcmp(line, "get") == 0) {
				snprintf(reply, sizeof(reply), "%s\n", value);
			} else if (strcmp(line, "poweroff") == 0) {
				say(conn, "bye\n");
				close(conn);
				sync();
				reboot(RB_AUTOBOOT);
			} else {
				snprintf(reply, sizeof(reply), "unknown\n");
			}
			say(conn, reply);
		}
		close(conn);
	}
}

int main(void)
{
	struct sockaddr_vm any = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
				  .svm_port = COMMAND_PORT};
	int listener;

	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	console = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (console < 0)
		console = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
	mkdir("/proc", 0555);
	mount("proc", "/proc", "proc", 0, NULL);

	check_disk();
	listener = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (listener < 0 || bind(listener, (struct sockaddr *)&any, sizeof(any)) != 0 ||
	    listen(listener, 16) != 0) {
		say(console, "CUBE-VSOCK-FAIL\n");
		reboot(RB_AUTOBOOT);
	}
	say_hello();
	say(console, "CUBE-VMM-TEST-READY\n");
	serve(listener);
	return 0;
}
