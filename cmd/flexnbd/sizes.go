package main

import (
	"fmt"
	"math/big"
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
	bad := fmt.Errorf("%q is not a size (bytes, or a number with a unit: 512K, 1G, 1GiB, 1GB)", s)
	// The number is read here rather than by humanize, which drops
	// commas (1,5G would be 15 GiB) and rounds fractions of a byte down.
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	num, unit := t[:i], strings.TrimSpace(t[i:])
	if strings.ContainsRune(t, ',') {
		return 0, fmt.Errorf("%q is not a size: write a decimal point, not a comma", s)
	}
	n, ok := new(big.Rat).SetString(num)
	if num == "" || strings.Count(num, ".") > 1 || !ok {
		return 0, bad
	}
	mult := uint64(1)
	if unit != "" {
		if len(unit) == 1 && bareUnit("1"+unit) {
			unit += "iB"
		}
		m, err := humanize.ParseBytes("1" + unit)
		if err != nil {
			return 0, bad
		}
		mult = m
	}
	n.Mul(n, new(big.Rat).SetUint64(mult))
	if !n.IsInt() {
		return 0, fmt.Errorf("%q is not a whole number of bytes", s)
	}
	if !n.Num().IsUint64() {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return n.Num().Uint64(), nil
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
