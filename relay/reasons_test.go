package relay

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestReasonsListed: every Reason the submission side passes to its
// Observer is in the list metrics initialises its series from, so that
// no refusal is counted under a label nobody knows of.
func TestReasonsListed(t *testing.T) {
	fset := token.NewFileSet()
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	lists := map[string][]Reason{
		"Rejected":          RejectReasons(),
		"ConnectionRefused": RefuseReasons(),
		"reject":            append(RejectReasons(), ReasonAuthFailed, ReasonAuthIdentity, ReasonAuthBlocked),
	}
	values := map[string]Reason{}
	for _, r := range append(append(RejectReasons(), RefuseReasons()...), ReasonAuthFailed, ReasonAuthIdentity, ReasonAuthBlocked) {
		values[reasonName(r)] = r
	}
	found := 0
	for _, f := range files {
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			list, ok := lists[sel.Sel.Name]
			if !ok {
				return true
			}
			arg := call.Args[0]
			if sel.Sel.Name != "reject" {
				arg = call.Args[1]
			}
			id, ok := arg.(*ast.Ident)
			if !ok || !strings.HasPrefix(id.Name, "Reason") {
				if ok && id.Name == "reason" {
					return true // passed on from a caller that is checked itself
				}
				t.Errorf("%s: %s with a reason that is not a Reason constant", fset.Position(call.Pos()), sel.Sel.Name)
				return true
			}
			found++
			r, known := values[id.Name]
			if !known || !slices.Contains(list, r) {
				t.Errorf("%s: %s(%s) is not in the list of its reasons", fset.Position(call.Pos()), sel.Sel.Name, id.Name)
			}
			return true
		})
	}
	if found < 20 {
		t.Errorf("found %d calls with a reason: the test no longer sees them", found)
	}
}

// reasonName is the constant's name for a Reason: "ReasonAuthRequired"
// for "auth_required".
func reasonName(r Reason) string {
	var b strings.Builder
	b.WriteString("Reason")
	for part := range strings.SplitSeq(string(r), "_") {
		b.WriteString(strings.ToUpper(part[:1]) + part[1:])
	}
	return strings.Replace(b.String(), "PerIp", "PerIP", 1)
}
