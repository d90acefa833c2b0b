//go:build !linux

package tokenwire_test

import "os/exec"

func setParentDeathSignal(*exec.Cmd) {}
