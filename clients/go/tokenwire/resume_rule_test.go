package tokenwire

import (
	"testing"

	"google.golang.org/grpc/codes"
)

// A replica that stopped under a shared response (UNAVAILABLE SERVER_STOPPING)
// ends the call, not the response: the client resumes elsewhere, as it does
// after a dropped connection. Any other tokenwire status is the response's end.
func TestResumeRuleTakesAStoppingReplicaButNoOtherTokenwireStatus(t *testing.T) {
	cases := []struct {
		err  *Error
		want bool
	}{
		{&Error{Code: codes.Unavailable}, true},
		{&Error{Code: codes.Unavailable, Domain: ErrorDomain, Reason: "SERVER_STOPPING"}, true},
		{&Error{Code: codes.Unavailable, Domain: ErrorDomain, Reason: "BACKEND_UNAVAILABLE"}, false},
		{&Error{Code: codes.Unavailable, Domain: ErrorDomain, Reason: "STORE_UNAVAILABLE"}, false},
		{&Error{Code: codes.Canceled, Domain: ErrorDomain, Reason: "SERVER_STOPPING"}, false},
		{&Error{Code: codes.Internal}, false},
	}
	for _, c := range cases {
		if got := worthResuming(c.err); got != c.want {
			t.Errorf("worthResuming(%v %q %q) = %v, want %v", c.err.Code, c.err.Domain, c.err.Reason, got, c.want)
		}
	}
}
