package tokenwire_test

import (
	"os/exec"
	"syscall"
)

// The server dies with the test binary, even when `go test` times out.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
