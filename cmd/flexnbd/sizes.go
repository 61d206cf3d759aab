package main

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/alecthomas/kong"
	"github.com/dustin/go-humanize"
)

// parseSize reads a byte count: a plain number is bytes, as the C flexnbd
// takes it; otherwise a number with a unit. A bare unit letter (512K, 1G)
// is binary, as qemu-img, nbdkit and the C tools read it; the spelled-out
// units keep their standard meaning: 1GiB is 2^30 bytes, 1GB 10^9.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if n, err := strconv.ParseUint(t, 10, 64); err == nil {
		return n, nil
	}
	if bareUnit(t) {
		t += "iB"
	}
	n, err := humanize.ParseBytes(t)
	if err != nil || strings.HasPrefix(t, "-") {
		return 0, fmt.Errorf("%q is not a size (bytes, or a number with a unit: 512K, 1G, 1GiB, 1GB)", s)
	}
	return n, nil
}

// bareUnit tells whether s ends with a unit letter alone, after a digit,
// a decimal point or a space.
func bareUnit(s string) bool {
	if len(s) < 2 || !strings.ContainsRune("kKmMgGtTpPeE", rune(s[len(s)-1])) {
		return false
	}
	prev := s[len(s)-2]
	return prev >= '0' && prev <= '9' || prev == '.' || prev == ' '
}

// sizeMapper lets any integer flag tagged type:"size" take a size with a
// unit, so the fields keep their integer types.
type sizeMapper struct{}

func (sizeMapper) Decode(ctx *kong.DecodeContext, target reflect.Value) error {
	var s string
	if err := ctx.Scan.PopValueInto("size", &s); err != nil {
		return err
	}
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	switch target.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		if target.OverflowUint(n) {
			return fmt.Errorf("%s is too large", s)
		}
		target.SetUint(n)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if n > 1<<63-1 || target.OverflowInt(int64(n)) {
			return fmt.Errorf("%s is too large", s)
		}
		target.SetInt(int64(n))
	default:
		return fmt.Errorf("type:\"size\" on a %s field", target.Kind())
	}
	return nil
}
